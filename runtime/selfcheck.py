"""`memserve selfcheck`: is this device computing memserve's math right, and how fast?

1. every op in `memserve.kernels` on the device (CUDA tensors take the Triton kernels, CPU
   tensors the torch paths) against its `*_ref` reference over small odd shapes;
2. a bandwidth figure per op (bytes the op must read / time) as a fraction of the device's
   peak: a table of known GPU peaks read from the device name, on a CPU the DRAM copy
   bandwidth measured here with a streaming copy;
3. the engine's decode tok/s at 1/16/64 streams (`--model`, `--streams`, `--quick`).

Prints one table; returns 1 if any op disagrees with its reference (a user with a new GPU runs
this first). The engine runs on the same device (EngineArgs.device).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# HBM / GDDR peak bandwidth in GB/s from the vendors' data sheets; first matching substring wins.
GPU_PEAK_GBPS = [
    ("H200", 4800), ("H100 PCIe", 2000), ("H100 NVL", 3900), ("H100", 3350), ("GH200", 4000),
    ("B200", 8000), ("A100-SXM4-80GB", 2039), ("A100 80GB", 1935), ("A100", 1555),
    ("L40S", 864), ("L40", 864), ("L4", 300), ("A10G", 600), ("A10", 600), ("A6000", 768),
    ("RTX 4090", 1008), ("RTX 3090", 936), ("V100", 900), ("T4", 320),
]


def gpu_peak_gbps(name: str) -> float | None:
    for key, gbps in GPU_PEAK_GBPS:
        if key.lower() in name.lower():
            return float(gbps)
    return None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable, device, repeats: int = 5) -> float:
    """Minimum seconds per call over `repeats` (after one warm-up)."""
    fn()
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_copy_gbps(device, nbytes: int = 256 << 20) -> float:
    """Streaming copy bandwidth (read + write bytes / time)."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    return 2 * nbytes / _time(lambda: y.copy_(x), device) / 1e9


@dataclass
class Case:
    op: str
    run: Callable[[], list[tuple[torch.Tensor, torch.Tensor]]]  # -> pairs (got, reference)
    bench: Callable[[], Callable[[], object]] | None = None      # -> zero-arg timed call
    bench_bytes: int = 0
    tol: float = 2e-4


def _paged(device, lens, Hkv, D, BS, g):
    nbs = [(n + BS - 1) // BS for n in lens]
    NB = sum(nbs) + 2
    kc = torch.randn(NB, BS, Hkv, D, generator=g).to(device)
    vc = torch.randn(NB, BS, Hkv, D, generator=g).to(device)
    perm = torch.randperm(NB, generator=g)
    bt = torch.zeros(len(lens), max(nbs), dtype=torch.int32)
    o = 0
    for i, nb in enumerate(nbs):
        bt[i, :nb] = perm[o:o + nb].int()
        o += nb
    return kc, vc, bt.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def build_cases(device) -> list[Case]:
    from memserve import kernels as K
    from memserve.kernels.block_scoring import score_blocks_infllm_ref, score_blocks_quest_ref
    from memserve.kernels.kv_quant import dequantize_kv_ref, quantize_kv_ref
    from memserve.kernels.merge import merge_attention_ref

    g = torch.Generator().manual_seed(0)

    def rn(*s):
        return torch.randn(*s, generator=g).to(device)

    cases: list[Case] = []

    def paged():
        pairs = []
        for lens, Hq, Hkv, D, BS in [([1], 4, 4, 16, 16), ([17, 1, 50], 9, 3, 64, 16), ([33, 8, 100], 8, 2, 72, 8)]:
            kc, vc, bt, sl = _paged(device, lens, Hkv, D, BS, g)
            q = rn(len(lens), Hq, D)
            o, lse = K.paged_decode_attention(q, kc, vc, bt, sl, D ** -0.5)
            ro, rl = K.paged_decode_attention_ref(q, kc, vc, bt, sl, D ** -0.5)
            pairs += [(o, ro), (lse, rl)]
        return pairs

    def paged_bench():
        kc, vc, bt, sl = _paged(device, [1024] * 4, 3, 64, 16, g)
        q = rn(4, 9, 64)
        return lambda: K.paged_decode_attention(q, kc, vc, bt, sl, 0.125)
    cases.append(Case("paged_decode_attention", paged, paged_bench, 2 * 4 * 1024 * 3 * 64 * 4))

    def prefill():
        pairs = []
        for Hq, Hkv, D in [(9, 3, 64), (4, 4, 72)]:
            lq, lk = [5, 1, 7, 16], [5, 9, 20, 16]
            q, k, v = rn(sum(lq), Hq, D), rn(sum(lk), Hkv, D), rn(sum(lk), Hkv, D)
            cq = torch.tensor([0] + lq).cumsum(0).int().to(device)
            ck = torch.tensor([0] + lk).cumsum(0).int().to(device)
            pairs.append((K.prefill_attention(q, k, v, cq, ck, 0.125, True),
                          K.prefill_attention_ref(q, k, v, cq, ck, 0.125, True)))
        return pairs
    cases.append(Case("prefill_attention", prefill))

    def sparse():
        kc, vc, bt, sl = _paged(device, [100, 40], 3, 64, 16, g)
        ids = torch.stack([torch.stack([torch.randperm(kc.shape[0], generator=g)[:3] for _ in range(3)])
                           for _ in range(2)]).int().to(device)
        q = rn(2, 9, 64)
        o, lse = K.block_sparse_decode_attention(q, kc, vc, ids, 0.125)
        ro, rl = K.block_sparse_decode_attention_ref(q, kc, vc, ids, 0.125)
        return [(o, ro), (lse, rl)]
    cases.append(Case("block_sparse_decode_attention", sparse))

    def merge():
        oa, ob = rn(5, 9, 64), rn(5, 9, 64)
        la, lb = rn(5, 9), rn(5, 9)
        o, lse = K.merge_attention(oa, la, ob, lb)
        ro, rl = merge_attention_ref(oa, la, ob, lb)
        return [(o, ro), (lse, rl)]

    def merge_bench():
        oa, ob, la, lb = rn(4096, 9, 64), rn(4096, 9, 64), rn(4096, 9), rn(4096, 9)
        return lambda: K.merge_attention(oa, la, ob, lb)
    cases.append(Case("merge_attention", merge, merge_bench, 2 * 4096 * 9 * 65 * 4))

    def kvq():
        pairs = []
        for kind in ("k", "v"):
            for bits in (8, 4):
                x = rn(3, 40, 2, 72)
                got = K.dequantize_kv(K.quantize_kv(x, kind, bits))
                ref = dequantize_kv_ref(quantize_kv_ref(x, kind, bits))
                pairs.append((got, ref))
        return pairs

    def kvq_bench():
        x = rn(256, 128, 3, 64)
        return lambda: K.quantize_kv(x, "v", 8)
    cases.append(Case("quantize_kv / dequantize_kv", kvq, kvq_bench, 256 * 128 * 3 * 64 * 4, tol=1e-5))

    def scoring():
        q, reprs = rn(2, 9, 64), rn(20, 3, 64)
        kmin = rn(20, 3, 64)
        kmax = kmin + rn(20, 3, 64).abs()
        cand = torch.tensor([[0, 3, 5, 19, -1], [1, 2, 7, -1, -1]], dtype=torch.int32, device=device)
        return [(K.score_blocks_infllm(q, reprs, cand), score_blocks_infllm_ref(q, reprs, cand)),
                (K.score_blocks_quest(q, kmin, kmax, cand), score_blocks_quest_ref(q, kmin, kmax, cand))]
    cases.append(Case("score_blocks_infllm / quest", scoring))

    def pkm():
        q, keys = rn(7, 2, 32), rn(2, 2, 64, 16)
        gi, gw = K.pkm_topk(q, keys, 8)
        ri, rw = K.pkm_topk_ref(q, keys, 8)
        return [(gi.sort(-1).values, ri.sort(-1).values), (gw.sort(-1).values, rw.sort(-1).values)]
    cases.append(Case("pkm_topk", pkm))

    def bag():
        table = rn(1000, 576)
        idx = torch.randint(0, 1000, (13, 7), generator=g).to(device)
        w = rn(13, 7)
        return [(K.embedding_bag(table, idx, w), K.embedding_bag_ref(table, idx, w))]

    def bag_bench():
        table = rn(200_000, 576)
        idx = torch.randint(0, 200_000, (256, 128), generator=g).to(device)
        w = rn(256, 128)
        return lambda: K.embedding_bag(table, idx, w)
    cases.append(Case("embedding_bag", bag, bag_bench, 256 * 128 * 576 * 4))
    return cases


def check_case(case: Case) -> tuple[bool, float, str]:
    """(ok, worst relative error, message)."""
    try:
        pairs = case.run()
    except Exception as e:  # a crash is a mismatch, reported with its reason
        return False, math.inf, f"{type(e).__name__}: {e}"[:120]
    worst = 0.0
    for got, ref in pairs:
        if got.shape != ref.shape:
            return False, math.inf, f"shape {tuple(got.shape)} vs reference {tuple(ref.shape)}"
        got, ref = got.double().cpu(), ref.double().cpu()
        fin = torch.isfinite(ref)
        if not torch.equal(fin, torch.isfinite(got)) or not torch.equal(got[~fin], ref[~fin]):
            return False, math.inf, "non-finite values differ"
        if fin.any():
            err = ((got[fin] - ref[fin]).abs().max() / ref[fin].abs().max().clamp_min(1e-6)).item()
            worst = max(worst, err)
    ok = worst <= case.tol
    return ok, worst, "" if ok else f"max rel. error {worst:.2e} > {case.tol:.0e}"


def engine_decode(model: str, streams: list[int], max_tokens: int, threads: int | None,
                  device: str = "cpu") -> list[tuple[int, float]]:
    from memserve.runtime.llm import LLM
    from memserve.runtime.sampling import SamplingParams

    llm = LLM(model, max_num_seqs=max(streams), threads=threads, device=device, progress=False)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    out = []
    for n in streams:
        prompts = [[1 + (7 * i + j) % 50 for j in range(8)] for i in range(n)]
        llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), use_tqdm=False)
        t0 = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        out.append((n, n * max_tokens / (time.perf_counter() - t0)))
    return out


def run(device: str = "cpu", model: str = "default", streams=(1, 16, 64), max_tokens: int = 32,
        threads: int | None = None, bench: bool = True, engine: bool = True, print_fn=print) -> int:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print_fn("memserve selfcheck: --device cuda but torch sees no CUDA device (use --device cpu)")
        return 2
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        peak = gpu_peak_gbps(name)
        peak_src = f"data-sheet peak of {name}" if peak else f"{name}: not in the table, measured copy"
        if peak is None:
            peak = measure_copy_gbps(dev)
    else:
        name = f"cpu ({torch.get_num_threads()} threads)"
        peak = measure_copy_gbps(dev) if bench else float("nan")
        peak_src = "DRAM copy bandwidth measured here"
    rows, failed = [], 0
    for case in build_cases(dev):
        ok, err, msg = check_case(case)
        failed += not ok
        gbps = frac = ""
        if bench and case.bench is not None and ok:
            s = _time(case.bench(), dev)
            gbps = f"{case.bench_bytes / s / 1e9:.1f}"
            frac = f"{100 * case.bench_bytes / s / 1e9 / peak:.0f}%"
        rows.append((case.op, "ok" if ok else "MISMATCH", f"{err:.1e}", gbps, frac, msg))
    print_fn(f"memserve selfcheck on {name}; peak {peak:.0f} GB/s ({peak_src})")
    print_fn("| check | result | max rel. err | GB/s | % of peak | note |")
    print_fn("|---|---|---:|---:|---:|---|")
    for r in rows:
        print_fn("| " + " | ".join(r) + " |")
    if engine:
        try:
            for n, tps in engine_decode(model, list(streams), max_tokens, threads, device):
                print_fn(f"| engine decode {n} stream(s), {max_tokens} tokens each ({model}, {device}) | ok | | "
                         f"{tps:.1f} tok/s | | |")
        except Exception as e:
            failed += 1
            print_fn(f"| engine decode ({model}) | FAILED | | | | {type(e).__name__}: {e} |")
    print_fn(f"{failed} check(s) failed" if failed else "all checks passed")
    return 1 if failed else 0
