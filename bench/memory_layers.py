"""Memory-layer benchmark (issue 16): value-table bag bandwidth and decode speed of a memory-layer model.

    flock /tmp/memserve-bench.lock .venv/bin/python bench/memory_layers.py [--quick] [--threads N]

1. Bag bandwidth. memserve's `embedding_bag` (the ValueStore read of every memory layer) against
   torch's own peer on the same indices and weights, at 64 MB / 1 GB / 4 GB value tables of v_dim
   576 (SmolLM2's hidden size), fp32 / bf16 / int8 rows. Access as in PKM: heads x knn = 4 x 32 =
   128 random rows per token, T tokens per call (16 = a 16-stream decode step, 256 = a prefill
   chunk). Peers: `F.embedding_bag` (fp32, bf16; bf16 per-sample weights, it requires the table's
   dtype) and, for int8, fbgemm's 8-bit rowwise bag `quantized.embedding_bag_byte_rowwise_offsets`
   (its rows carry an fp32 scale + bias: E + 8 bytes). Bytes = the rows the pairs read (T * K *
   row bytes, + 4 B of scale per pair for memserve's int8); GB/s as a fraction of this machine's
   DRAM read bandwidth, measured by bench/kernel_roofline.py's `measure_memory_bandwidth`
   (a sequential sum over 512 MB, same threads). Minimum over repeats, variants interleaved; every
   call reads a fresh random index set (sets of one case cover >= 512 MB of rows, so repeats do not
   hit the 105 MB L3). A 64 MB table fits that L3: its rows are a cache figure, not DRAM.
2. Decode tok/s at 1 and 16 streams: the base (default: SmolLM2-135M, the default model) against
   the same base + memory layers (`init-memory`, default layers 8,16,24, n_keys 1024 = 1M slots,
   one value table shared by the three layers), and a control (the memory model's dense weights,
   its memory layers skipped), all loaded in this process and measured in interleaved rounds (best
   of rounds each); ratio = memory / base (control / base ~ 1 is the noise floor). init-memory's
   value_proj is zero, so base and memory model must emit the same greedy tokens (checked): the
   memory work is all done, its output is 0. Then min-of-30 timings of one memory layer's pieces.

Prints the tables, writes bench/results/memory_layers.md (+ .json) and memory_layers.png.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from host_info import cpu_name  # noqa: E402
from kernel_roofline import measure_memory_bandwidth, run_case  # noqa: E402
from memserve.kernels import embedding_bag  # noqa: E402
from throughput import decode_tok_s, prompt_ids  # noqa: E402

RESULTS = BENCH / "results"
MODEL_CACHE = Path("/tmp/memserve_bench_models")
ELSIZE = {"float32": 4, "bfloat16": 2, "int8": 1}



# ----------------------------------------------------------------------------------------------- bag
def _table(rows: int, E: int, dtype: str, touched: torch.Tensor):
    """(table, scales, fbgemm table): all pages written (an untouched page reads as the shared zero page,
    which would flatter any bag): a bulk constant fill at memset speed, random values in the rows the
    bag reads so both variants' outputs can be compared.
    int8: ONE buffer in fbgemm's rowwise layout [E uint8 codes | fp32 scale | fp32 bias] per row serves
    both (a 4 GB table fits the shared RAM once, not twice): memserve reads its codes as a strided
    int8 view (rows E + 8 bytes apart) with its own fp32 scales; codes are kept in [0, 127], where
    the int8 and uint8 readings agree, so bias = 0 and both compute row = scale * code."""
    g = torch.Generator().manual_seed(rows)
    if dtype != "int8":
        t = torch.empty(rows, E, dtype=getattr(torch, dtype))
        t.fill_(0.01)
        t[touched] = torch.randn(len(touched), E, generator=g).to(t.dtype)
        return t, None, None
    p = torch.empty(rows, E + 8, dtype=torch.uint8)
    p.fill_(1)
    p[touched, :E] = torch.randint(0, 128, (len(touched), E), generator=g, dtype=torch.uint8)
    scales = torch.full((rows,), 0.01)
    scales[touched] = torch.rand(len(touched), generator=g) * 0.02
    sb = p[:, E:].view(torch.float32)  # E and E + 8 are multiples of 4: an aligned fp32 (rows, 2) view
    sb[:, 0] = scales
    sb[:, 1] = 0.0
    return p[:, :E].view(torch.int8), scales, p


# Every timed call reads a fresh index set, and the sets of one case together cover >= 512 MB of rows
# (this VM's L3 is 105 MB): repeating one set would time cache hits after the first call (measured:
# 24 GB/s "bag bandwidth" at T=16 on a 1 GB table with 5.1 GB/s of DRAM read).
_SWEEP_BYTES = 512 << 20
_MIN_SETS = 40  # >= the calls of one case (rounds x variants x (repeats + warm-up))


def bag_cases(sizes_mb: list[int], dtypes: list[str], tokens: list[int], E: int, K: int, dev,
              rounds: int = 3) -> list[dict]:
    """-> rows {size_mb, dtype, T, ours_s, peer_s, ours_bytes, peer_bytes, peer, max_rel_diff}"""
    out = []
    for size in sizes_mb:
        for dtype in dtypes:
            rows = (size << 20) // (E * ELSIZE[dtype])
            row_b = E * ELSIZE[dtype]
            g = torch.Generator().manual_seed(size)
            sets = {}
            for T in tokens:
                n = max(_MIN_SETS, -(-_SWEEP_BYTES // (T * K * row_b)))
                sets[T] = (torch.randint(0, rows, (n, T, K), generator=g), torch.rand(n, T, K, generator=g))
            touched = torch.cat([sets[T][0][0].reshape(-1) for T in tokens]).unique()  # set 0: checked
            t0 = time.perf_counter()
            table, scales, packed = _table(rows, E, dtype, touched)
            fill_s = time.perf_counter() - t0
            for T in tokens:
                idxs, ws = sets[T]
                wps = ws.to(table.dtype) if dtype != "int8" else ws
                offs = torch.arange(0, T * K, K)
                step = iter(range(1, 1 << 40))  # one counter for both variants: no set is read twice in a row

                def ours(i=None, idxs=idxs, ws=ws, table=table, scales=scales, step=step):
                    i = next(step) % len(idxs) if i is None else i
                    return embedding_bag(table, idxs[i], ws[i], out_dtype=torch.float32, scales=scales)

                if dtype == "int8":
                    peer_name, peer_b = "fbgemm 8-bit rowwise bag", T * K * (E + 8)

                    def peer(i=None, idxs=idxs, ws=ws, packed=packed, offs=offs, step=step):
                        i = next(step) % len(idxs) if i is None else i
                        return torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                            packed, idxs[i].reshape(-1), offs, False, 0, False, ws[i].reshape(-1), None, False)
                else:
                    peer_name, peer_b = "F.embedding_bag", T * K * row_b

                    def peer(i=None, idxs=idxs, wps=wps, table=table, step=step):
                        i = next(step) % len(idxs) if i is None else i
                        return F.embedding_bag(idxs[i], table, mode="sum", per_sample_weights=wps[i])
                ours_b = T * K * (row_b + (4 if dtype == "int8" else 0))
                x, y = ours(0).float(), peer(0).float()
                rel = ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
                res = run_case(f"{size} MB {dtype} T={T}", [("peer", peer_b, peer), ("memserve", ours_b, ours)],
                               dev, rounds=rounds, repeats=5 if rounds > 1 else 2)
                out.append(dict(size_mb=size, dtype=dtype, rows=rows, T=T, K=K, E=E, peer=peer_name,
                                peer_s=res[0][3], ours_s=res[1][3], peer_bytes=peer_b, ours_bytes=ours_b,
                                max_rel_diff=rel, fill_s=fill_s, index_sets=len(idxs)))
                r = out[-1]
                print(f"  bag {size} MB {dtype:8s} T={T:4d}: memserve {ours_b / r['ours_s'] / 1e9:6.2f} GB/s, "
                      f"{peer_name} {peer_b / r['peer_s'] / 1e9:6.2f} GB/s (max rel diff {rel:.1e})", flush=True)
            del table, scales, packed
    return out


# ----------------------------------------------------------------------------------------------- decode
def memory_model_dir(a) -> Path:
    """init-memory's output for these arguments, cached (a 1M-slot fp32 table is 2.4 GB to write)."""
    from memserve.runtime.memory_layers_init import init_memory

    tag = "".join(c if c.isalnum() else "_" for c in Path(a.base).name)
    d = Path(a.model_cache) / (f"{tag}_L{a.layers.replace(',', '-')}_nk{a.n_keys}_h{a.heads}_knn{a.knn}"
                               f"_kd{a.k_dim}_{a.values_dtype}")
    if not (d / "config.json").exists():
        t0 = time.perf_counter()
        init_memory(a.base, str(d), [int(x) for x in a.layers.split(",")], n_keys=a.n_keys, heads=a.heads,
                    knn=a.knn, k_dim=a.k_dim, shared_values=True, progress=False, values_dtype=a.values_dtype)
        print(f"init-memory wrote {d} in {time.perf_counter() - t0:.0f} s", flush=True)
    return d


def greedy_tokens(eng, prompt_len: int, n: int) -> list[int]:
    from memserve.runtime import SamplingParams

    rid = f"greedy-{time.monotonic_ns()}"
    eng.add_request(rid, prompt_ids(prompt_len, 7), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    toks = []
    while eng.has_unfinished():
        for o in eng.step():
            toks += list(getattr(o, "new_token_ids", None) or [])
    return toks


def decode_cases(a, streams: list[int]) -> dict:
    from memserve.runtime import LLM

    mdir = memory_model_dir(a)
    kw = dict(progress=False, kv_cache_bytes=256 << 20, max_num_seqs=max(streams), max_num_batched_tokens=2048)
    base, mem = LLM(a.base, **kw).engine, LLM(str(mdir), **kw).engine
    # control: the memory model's own dense weights with its memory layers skipped. control / base ~ 1
    # says both load the same dense model and shows this run's noise floor; memory / control is then
    # the memory layers' own cost (a 17:55 A/B: control / base 1.01 and 0.97 at 1 and 16 streams)
    ctl = LLM(str(mdir), **kw).engine
    for L in ctl.model.layers:
        L.ffn.memory = None
    engines = (("base", base), ("control", ctl), ("memory", mem))
    info = mem.model.config.memory_layers
    # Steady state, as in a server that has run a while: the memory-mapped table's pages are mapped
    # before timing (one sequential read). Cold, the first 16 x 16 tokens of this model took 71k minor
    # page faults and ran at 30.9 tok/s vs 40.5 for the next 16 x 16 (3.8k faults).
    t0 = time.perf_counter()
    for st in mem.model.value_stores().values():
        if hasattr(st, "table"):
            st.table.sum()  # int8 sums in int64: no fp32 copy of the table
    print(f"  value table pages mapped in {time.perf_counter() - t0:.1f} s", flush=True)
    for _, eng in engines:  # warm-up (first-call allocations)
        decode_tok_s(eng, 1, 4, a.prompt)
    res = {"model": str(mdir), "layers": info.layers, "slots": info.num_slots, "shared": info.shared_values,
           "values_dtype": a.values_dtype, "tokens": a.decode_tokens}
    # which single-stream step each engine runs (runtime/decode_step.py: native / eager / compile; None:
    # Model.forward for every step): the 1-stream ratio compares like with like only when these agree
    res["decode_paths"] = {n: (e.decode_step.path if e.decode_step is not None else None) for n, e in engines}
    print(f"  single-stream decode paths: {res['decode_paths']}", flush=True)
    for s in streams:
        best, faults = {n: 0.0 for n, _ in engines}, {n: 0 for n, _ in engines}
        for _ in range(a.rounds):
            for name, eng in engines:
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                best[name] = max(best[name], decode_tok_s(eng, s, a.decode_tokens, a.prompt))
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        res[f"streams_{s}"] = dict(best, ratio=best["memory"] / best["base"], minor_faults=faults,
                                   ratio_control=best["control"] / best["base"])
        print(f"  decode {s:2d} streams: base {best['base']:.1f} tok/s, control {best['control']:.1f}, "
              f"memory {best['memory']:.1f} tok/s, "
              f"ratio {best['memory'] / best['base']:.3f}", flush=True)
    res["greedy_identical"] = greedy_tokens(base, a.prompt, 16) == greedy_tokens(mem, a.prompt, 16)
    res["components"] = component_ms(mem.model, streams, n=5 if a.quick else 30)
    if a.profile:
        res["profile"] = {n: profile_steps(e, a, max(streams)) for n, e in (("base", base), ("memory", mem))}
    return res


def component_ms(model, streams: list[int], n: int = 30) -> dict:
    """Min-of-n ms of one memory layer's pieces (fresh random rows for the bag) against one dense MLP of
    the same model, per T = streams tokens: what the memory layers add to a step, free of the box's
    load bursts that move whole decode runs by 2x."""
    from memserve.kernels import pkm_topk
    from memserve.kernels.pkm import pkm_topk_torch

    mem_i = next(i for i, L in enumerate(model.layers) if L.ffn.memory is not None)
    ffn = model.layers[mem_i].ffn
    m, c = ffn.memory, ffn.memory.cfg
    K = c.heads * c.knn
    g = torch.Generator().manual_seed(0)

    def t(f):
        f()
        best = float("inf")
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t0)
        return best * 1e3

    out = {}
    for T in streams:
        x = torch.randn(T, model.config.hidden_size, generator=g)
        q = F.linear(x, m.query_w, m.query_b).view(T, c.heads, c.k_dim)
        rows = [(torch.randint(0, m.values.num_rows, (T, K), generator=g), torch.rand(T, K, generator=g))
                for _ in range(n + 1)]
        it = iter(rows)
        with torch.inference_mode():
            out[T] = {"memory_layer": t(lambda x=x: m(x)),  # noqa: B023
                      "query_proj": t(lambda x=x: F.linear(x, m.query_w, m.query_b)),  # noqa: B023
                      "pkm_topk": t(lambda q=q: pkm_topk(q, m.keys, c.knn)),  # noqa: B023
                      "pkm_topk_torch": t(lambda q=q: pkm_topk_torch(q, m.keys, c.knn)),  # noqa: B023
                      "bag_fresh_rows": t(lambda: m.values.lookup(*next(it))),  # noqa: B023
                      "dense_mlp": t(lambda x=x: ffn.mlp(x)) if ffn.gate_up is not None else None}  # noqa: B023
        print(f"  T={T}: one memory layer {out[T]['memory_layer']:.2f} ms (query_proj {out[T]['query_proj']:.2f}, "
              f"pkm_topk {out[T]['pkm_topk']:.2f} (torch path {out[T]['pkm_topk_torch']:.2f}), bag {out[T]['bag_fresh_rows']:.2f}) vs its dense MLP "
              f"{out[T]['dense_mlp'] or 0:.2f} ms", flush=True)
    return out


def profile_steps(eng, a, streams: int) -> str:
    """torch.profiler over 4 decode steps of `streams` concurrent streams: top ops by self CPU time."""
    from memserve.runtime import SamplingParams
    from torch.profiler import ProfilerActivity, profile

    for i in range(streams):
        eng.add_request(f"prof-{i}-{time.monotonic_ns()}", prompt_ids(a.prompt, i),
                        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    for _ in range(3):  # prefill + first decode steps
        eng.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            eng.step()
    while eng.has_unfinished():
        eng.step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    print(table)
    return table


# ----------------------------------------------------------------------------------------------- report
def report(bags: list[dict], dec: dict | None, read_bw: float, threads: int, cpu: str) -> str:
    lines = [f"CPU {cpu}, torch threads {threads}, measured DRAM read {read_bw:.1f} GB/s "
             f"(bench/kernel_roofline.py measure_memory_bandwidth); box shared with other jobs.", ""]
    if bags:
        E, K = bags[0]["E"], bags[0]["K"]
        lines += [f"**Bag bandwidth** (v_dim {E}, K = {K} random rows per token; bytes = rows read; "
                  "minimum over repeats):", "",
                  "| table | dtype | rows | T | memserve GB/s | % DRAM read | peer | peer GB/s | % DRAM read | "
                  "memserve / peer (time) |", "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
        for r in bags:
            ob, pb = r["ours_bytes"] / r["ours_s"] / 1e9, r["peer_bytes"] / r["peer_s"] / 1e9
            size = f"{r['size_mb']} MB" if r["size_mb"] < 1024 else f"{r['size_mb'] >> 10} GB"
            lines.append(f"| {size} | {r['dtype']} | {r['rows']:,} | {r['T']} | {ob:.2f} | {100 * ob / read_bw:.0f}% | "
                         f"{r['peer']} | {pb:.2f} | {100 * pb / read_bw:.0f}% | {r['peer_s'] / r['ours_s']:.2f}x |")
        lines.append("")
    if dec:
        lines += [f"**Decode** ({dec['tokens']} tokens per stream, greedy; memory model: layers {dec['layers']}, "
                  f"{dec['slots']:,} slots, shared table {dec['shared']}, {dec['values_dtype']}; "
                  f"same greedy tokens as the base: {dec['greedy_identical']}; single-stream step: "
                  f"{dec.get('decode_paths')}):", "",
                  "| streams | base tok/s | control tok/s (memory dir, memory skipped) | memory model tok/s | "
                  "control / base | memory / base |", "|---:|---:|---:|---:|---:|---:|"]
        for k in sorted((k for k in dec if k.startswith("streams_")), key=lambda k: int(k.split("_")[1])):
            d = dec[k]
            lines.append(f"| {k.split('_')[1]} | {d['base']:.1f} | {d['control']:.1f} | {d['memory']:.1f} | "
                         f"{d['ratio_control']:.3f} | {d['ratio']:.3f} |")
        lines += ["", "One memory layer's pieces (min of 30 calls (quick: 5), ms; bag over fresh random rows of the mapped "
                  "table) vs one dense MLP of the same model:", "",
                  "| T tokens | memory layer | query_proj | pkm_topk | pkm_topk (torch path) | bag | dense MLP |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for T, d in dec.get("components", {}).items():
            lines.append(f"| {T} | {d['memory_layer']:.2f} | {d['query_proj']:.2f} | {d['pkm_topk']:.2f} | "
                         f"{d.get('pkm_topk_torch', 0):.2f} | "
                         f"{d['bag_fresh_rows']:.2f} | {d['dense_mlp'] or 0:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot(bags: list[dict], dec: dict | None, read_bw: float, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 1]})
    ax = axes[0]
    T = max(r["T"] for r in bags) if bags else 0
    sel = [r for r in bags if r["T"] == T]
    x = range(len(sel))
    ax.bar([i - 0.2 for i in x], [100 * r["ours_bytes"] / r["ours_s"] / 1e9 / read_bw for r in sel], 0.4,
           color="#3a7", label="memserve embedding_bag")
    ax.bar([i + 0.2 for i in x], [100 * r["peer_bytes"] / r["peer_s"] / 1e9 / read_bw for r in sel], 0.4,
           color="#888", label="torch peer (F.embedding_bag / fbgemm 8-bit)")
    ax.axhline(80, color="r", ls=":", label="target 80%")
    ax.set_xticks(list(x), [f"{r['size_mb']} MB\n{r['dtype']}" for r in sel], fontsize=8)
    ax.set_ylabel(f"% of measured DRAM read ({read_bw:.1f} GB/s)")
    ax.set_title(f"bag bandwidth, T={T} tokens x {sel[0]['K'] if sel else 0} rows")
    ax.legend(fontsize=8)
    ax = axes[1]
    if dec:
        ks = sorted((k for k in dec if k.startswith("streams_")), key=lambda k: int(k.split("_")[1]))
        for j, (name, col) in enumerate((("base", "#888"), ("memory", "#3a7"))):
            ax.bar([i + 0.4 * j - 0.2 for i in range(len(ks))], [dec[k][name] for k in ks], 0.4, color=col,
                   label=name)
        ax.set_xticks(range(len(ks)), [f"{k.split('_')[1]} streams\n{dec[k]['ratio']:.2f}x" for k in ks])
        ax.set_ylabel("decode tok/s")
        ax.set_title("decode: base vs + memory layers")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small tables, short decode")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on the shared 2-core box two threads "
                    "stall on OpenMP barriers: a 128x576 bf16->fp32 copy took 786 us at 2 threads vs 17 us at 1)")
    ap.add_argument("--sizes-mb", default=None, help="value-table sizes in MB (default 64,1024,4096; quick: 64)")
    ap.add_argument("--dtypes", default="float32,bfloat16,int8")
    ap.add_argument("--tokens", default=None, help="tokens per bag call (default 16,256; quick: 16)")
    ap.add_argument("--no-bag", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--base", default="default", help="dense base model")
    ap.add_argument("--layers", default="8,16,24")
    ap.add_argument("--n-keys", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--knn", type=int, default=32)
    ap.add_argument("--k-dim", type=int, default=256)
    ap.add_argument("--values-dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"])
    ap.add_argument("--streams", default="1,16")
    ap.add_argument("--decode-tokens", type=int, default=None, help="per stream and round (default 16; quick: 8)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per stream")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved decode rounds, best kept (default 6; quick: 1)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over memory-model decode steps")
    ap.add_argument("--model-cache", default=str(MODEL_CACHE))
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    a.decode_tokens = a.decode_tokens or (8 if a.quick else 16)
    a.rounds = a.rounds or (1 if a.quick else 6)
    torch.set_num_threads(a.threads)  # a benchmark process, not library code
    dev = torch.device("cpu")
    cpu = cpu_name()
    read_bw = measure_memory_bandwidth(dev, 64 if a.quick else 512)[0]
    print(f"{cpu}, {torch.get_num_threads()} threads, DRAM read {read_bw:.1f} GB/s", flush=True)
    bags = []
    if not a.no_bag:
        sizes = [int(x) for x in (a.sizes_mb or ("64" if a.quick else "64,1024,4096")).split(",")]
        tokens = [int(x) for x in (a.tokens or ("16" if a.quick else "16,256")).split(",")]
        bags = bag_cases(sizes, a.dtypes.split(","), tokens, E=576, K=a.heads * a.knn, dev=dev,
                         rounds=1 if a.quick else 3)
        read_bw = max(read_bw, measure_memory_bandwidth(dev, 64 if a.quick else 512)[0])  # best of before/after
    dec = None if a.no_decode else decode_cases(a, [int(x) for x in a.streams.split(",")])
    text = report(bags, dec, read_bw, torch.get_num_threads(), cpu)
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_layers.md").write_text(f"`bench/memory_layers.py {' '.join(argv or sys.argv[1:])}`\n\n{text}")
    (out / "memory_layers.json").write_text(json.dumps({"cpu": cpu, "threads": torch.get_num_threads(),
                                                        "read_gbs": read_bw, "bag": bags, "decode": dec}, indent=1))
    plot(bags, dec, read_bw, out / "memory_layers.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
