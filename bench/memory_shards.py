"""Memory shards (issue 17): what remote MemoryShard deployments cost against the in-engine value table.

    memserve init-memory --base default --layers 8,16,24 --n-keys 512 --out /tmp/smol_mem512
    flock /tmp/memserve-bench.lock .venv/bin/python bench/memory_shards.py --model /tmp/smol_mem512

One process: the engine (LLMEngine, in-process) and one local Ray Serve with the shard deployments of
one (layout, P) plan at a time (deployed, measured, deleted: at most 3 shard processes at once). For
each plan, in the same window as its in-engine peer (the engine's own TensorValueStore on the
memory-mapped checkpoint), alternating peer and remote so drift on a shared box hits both:
  * lookup latency of one layer-step (T = 1 and 16 tokens, K = heads*knn slots per token): the
    store alone, median of --calls calls; "added" = remote - in-engine;
  * decode tokens/s at 1 and 16 streams (greedy, ignore_eos), engine.model.replace_value_store
    swapping the remote store in and the local one back; the greedy tokens are compared;
  * bytes moved per token per memory layer (the store's counters: sent indices+weights, received rows).
Then shard-replica scaling: a columns P = 1 shard under a closed loop of C concurrent lookups of
--scale-tokens tokens (a prefill-sized step: shard compute dominates the call), C = 1, 2, 4, 8 at 1
replica, then redeployed at 2 replicas and C = 4, 8 again: throughput, p50/p99 latency, failures, and
Little's-law in-flight (= rate x latency), which is the quantity Serve's ongoing-requests autoscaling
reads. Writes bench/results/memory_shards.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

from host_info import cpu_name  # bench/ is on sys.path (script dir, `memserve bench`, tests)

RESULTS = Path(__file__).resolve().parent / "results"
PLANS = [("columns", 1), ("columns", 2), ("columns", 3), ("rows", 1), ("rows", 2), ("rows", 3)]



def prompt_ids(n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(200, 40000) for _ in range(n)]


def decode(eng, n_streams: int, n_tokens: int, tag: str) -> tuple[float, list[list[int]]]:
    """Decode tok/s of n_streams greedy streams (after every stream's first token) and their tokens."""
    from memserve.runtime import SamplingParams

    sp = SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True)
    ids = [f"{tag}-{n_streams}-{i}" for i in range(n_streams)]
    for i, rid in enumerate(ids):
        eng.add_request(rid, prompt_ids(16, i), sp)
    started, outs = set(), {}
    while len(started) < n_streams:
        for o in eng.step():
            started.add(o.request_id)
            outs[o.request_id] = o
    t0, produced = time.perf_counter(), 0
    while eng.has_unfinished():
        for o in eng.step():
            produced += 1
            outs[o.request_id] = o
    dt = time.perf_counter() - t0
    return produced / dt, [list(outs[r].token_ids) for r in ids]


def decode_peers(eng, tname: str, local, remote, n: int, tokens: int, repeats: int, tag: str) -> dict:
    """Decode tok/s of n streams, in-engine vs remote, `repeats` rounds with the peers in alternating
    order; ratios are per round (each remote run against the local run of its own round), medians."""
    tps, toks = {"local": [], "remote": []}, {}
    for k in range(repeats):
        for p in (("local", "remote") if k % 2 == 0 else ("remote", "local")):
            if p == "remote":
                eng.model.replace_value_store(tname, remote)
            try:
                t, tok = decode(eng, n, tokens, f"{p}{tag}r{k}")
            finally:
                eng.model.replace_value_store(tname, local)
            tps[p].append(t)
            toks.setdefault(p, tok)
            if toks[p] != tok:
                toks[p] = None  # not even the same peer repeated its tokens
    med = statistics.median
    return {"local_tok_s": med(tps["local"]), "remote_tok_s": med(tps["remote"]),
            "ratio": med([r / lo for r, lo in zip(tps["remote"], tps["local"])]),
            "same_tokens": toks["local"] is not None and toks["remote"] == toks["local"], "repeats": repeats,
            "local_runs": tps["local"], "remote_runs": tps["remote"]}


def step_inputs(T: int, K: int, rows: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, rows, (T, K), generator=g), torch.softmax(torch.randn(T, K, generator=g), -1)


def time_lookups(local, remote, T: int, K: int, rows: int, calls: int) -> dict:
    """Median/p90 ms of one layer-step lookup, in-engine vs remote, alternating call by call."""
    loc, rem = [], []
    for c in range(calls + 3):
        idx, w = step_inputs(T, K, rows, c)
        t0 = time.perf_counter()
        a = local.lookup(idx, w)
        t1 = time.perf_counter()
        b = remote.lookup(idx, w)
        t2 = time.perf_counter()
        if c >= 3:  # warm-up calls dropped
            loc.append(t1 - t0)
            rem.append(t2 - t1)
        assert a.shape == b.shape
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {"local_ms": 1e3 * statistics.median(loc), "remote_ms": 1e3 * statistics.median(rem),
            "remote_p90_ms": 1e3 * q(rem, 0.9), "added_ms": 1e3 * (statistics.median(rem) - statistics.median(loc))}


def closed_loop(store, conc: int, seconds: float, T: int, K: int, rows: int) -> dict:
    """C threads, each sending its next lookup when the last returns; throughput and latency."""
    lat, errors, stop = [], [], threading.Event()

    def worker(k: int):
        n = 0
        while not stop.is_set():
            idx, w = step_inputs(T, K, rows, 1000 * k + n % 8)
            t0 = time.perf_counter()
            try:
                store.lookup(idx, w)
                lat.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - a failed request is counted, not raised
                errors.append(repr(e))
            n += 1

    ths = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(conc)]
    t0 = time.perf_counter()
    for t in ths:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in ths:
        t.join(timeout=60)
    wall = time.perf_counter() - t0
    s = sorted(lat) or [float("nan")]
    rate = len(lat) / wall
    p50 = s[len(s) // 2]
    return {"concurrency": conc, "lookups_s": rate, "tokens_s": rate * T, "p50_ms": 1e3 * p50,
            "p99_ms": 1e3 * s[min(len(s) - 1, int(0.99 * len(s)))], "in_flight": rate * statistics.mean(s),
            "failed": len(errors), "done": len(lat)}


def running(serve, app: str) -> int:
    st = serve.status().applications.get(app)
    return 0 if st is None else int(st.deployments[app].replica_states.get("RUNNING", 0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a memory-layer model dir (memserve init-memory)")
    ap.add_argument("--plans", default=",".join(f"{lay}:{p}" for lay, p in PLANS), help="LAYOUT:P,... or 'none' (scaling only)")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=24, help="decode tokens per stream")
    ap.add_argument("--repeats", type=int, default=3, help="decode rounds per peer (alternating order)")
    ap.add_argument("--streams", default="1,16")
    ap.add_argument("--scale-tokens", type=int, default=128)
    ap.add_argument("--scale-seconds", type=float, default=8.0)
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "memory_shards"))
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="only write --out from these results (runs of plan subsets, each hold <= 10 min)")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from memserve.deploy.app import SERVE_ENV

    for k, v in SERVE_ENV.items():  # before ray.serve is imported (its constants read them once): the
        os.environ.setdefault(k, v)  # driver then calls shards in the mode an engine replica does
    import ray
    import torch
    from memserve.deploy.app import init_ray
    from memserve.deploy.memory_shards import load_specs, shard_deployment, shard_memory
    from memserve.deploy.remote_value_store import RemoteValueStore
    from memserve.runtime import LLMEngine
    from ray import serve

    torch.set_num_threads(1)
    eng = LLMEngine(args.model, progress=False, kv_cache_bytes=256 << 20, max_num_seqs=16, kv_memory="off")
    mc = eng.config.memory_layers
    stores = eng.model.value_stores()
    (tname, local), = stores.items()  # shared_values: one table read by every memory layer
    K, rows, dim = mc.heads * mc.knn, local.num_rows, local.dim
    n_mem = len(mc.layers)
    streams = [int(s) for s in args.streams.split(",")]
    plans = [] if args.plans == "none" else [(p.split(":")[0], int(p.split(":")[1])) for p in args.plans.split(",")]
    meta = {"cpu": cpu_name(), "cores": os.cpu_count(), "model": args.model, "memory_layers": mc.layers,
            "slots": rows, "v_dim": dim, "K": K, "table_MiB": local.nbytes / 2**20, "table_dtype": local.dtype,
            "decode_tokens": args.tokens, "load_avg_start": os.getloadavg()[0]}
    print(json.dumps(meta))

    for attempt in range(3):  # Ray's raylet start wait is a fixed 30 s: on an overloaded box, try again
        try:
            init_ray(num_cpus=os.cpu_count(), log_to_driver=False, logging_level="ERROR")
            break
        except Exception as e:  # noqa: BLE001
            print(f"ray.init failed ({e}); retry {attempt + 1}")
            ray.shutdown()
    else:
        raise RuntimeError("ray.init failed 3 times")
    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    rows_out, scale_out = [], []
    try:
        for layout, P in plans:
            shard_memory(args.model, P, layout)
            specs = load_specs(args.model, P, layout)[tname]
            handles = [serve.run(shard_deployment(s), name=s.name, route_prefix=None, blocking=False) for s in specs]
            for h in handles:
                h.info.remote().result(timeout_s=300)
            remote = RemoteValueStore.from_specs(specs, handles)
            r = {"layout": layout, "P": P}
            for T in (1, 16):
                b0, s0 = remote.bytes_received, remote.bytes_sent
                r[f"T{T}"] = time_lookups(local, remote, T, K, rows, args.calls)
                n_tok = T * (args.calls + 3)
                sent = remote.bytes_sent - s0
                r[f"T{T}"]["sent_B_per_token"] = sent / n_tok
                r[f"T{T}"]["recv_B_per_token"] = (remote.bytes_received - b0 - sent) / n_tok
            for n in streams:
                r[f"decode_{n}"] = decode_peers(eng, tname, local, remote, n, args.tokens, args.repeats, f"{layout}{P}")
            print(json.dumps(r))
            rows_out.append(r)
            for s in specs:
                serve.delete(s.name, _blocking=True)

        if not args.no_scaling:
            shard_memory(args.model, 1, "columns")
            (s,) = load_specs(args.model, 1, "columns")[tname]
            h = serve.run(shard_deployment(s), name=s.name, route_prefix=None, blocking=False)
            h.info.remote().result(timeout_s=300)
            store = RemoteValueStore.from_specs([s], [h])
            for c in (1, 2, 4, 8):
                scale_out.append({"replicas": 1, **closed_loop(store, c, args.scale_seconds, args.scale_tokens, K, rows)})
                print(json.dumps(scale_out[-1]))
            serve.run(shard_deployment(s, replicas=(2, 2)), name=s.name, route_prefix=None, blocking=False)
            t0 = time.monotonic()
            while not (running(serve, s.name) == 2 and serve.status().applications[s.name].status == "RUNNING"):
                if time.monotonic() - t0 > 300:
                    raise TimeoutError("second shard replica did not start in 300 s")
                time.sleep(0.5)
            time.sleep(2.0)  # the handle's router learns the new replica
            for c in (4, 8):
                scale_out.append({"replicas": 2, **closed_loop(store, c, args.scale_seconds, args.scale_tokens, K, rows)})
                print(json.dumps(scale_out[-1]))
            serve.delete(s.name, _blocking=True)
    finally:
        ray.shutdown()
    meta["load_avg_end"] = os.getloadavg()[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"meta": meta, "plans": rows_out, "scaling": scale_out, "n_memory_layers": n_mem}
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(render_md(res, streams))
    plot(res, streams, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())
    return 0


def merge(paths: list[str], out: Path) -> int:
    """One table from several runs (plans in run order; load range and scaling from all of them)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    meta = dict(runs[0]["meta"])
    meta["load_avg_start"] = min(r["meta"]["load_avg_start"] for r in runs)
    meta["load_avg_end"] = max(r["meta"]["load_avg_end"] for r in runs)
    res = {"meta": meta, "plans": [p for r in runs for p in r["plans"]], "scaling": [s for r in runs for s in r["scaling"]],
           "n_memory_layers": runs[0]["n_memory_layers"], "merged_from": paths}
    streams = sorted({int(k.split("_")[1]) for p in res["plans"] for k in p if k.startswith("decode_")})
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(render_md(res, streams))
    plot(res, streams, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())
    return 0


def _repeats(res: dict) -> int:
    return next((v.get("repeats", 1) for p in res["plans"] for k, v in p.items() if k.startswith("decode_")), 1)


def render_md(res: dict, streams: list[int]) -> str:
    m = res["meta"]
    L = [f"Memory shards vs the in-engine table: {m['model']} ({m['slots']} slots x {m['v_dim']} {m['table_dtype']}, "
         f"{m['table_MiB']:.0f} MiB, memory layers {m['memory_layers']}, K = {m['K']} slots/token), "
         f"CPU {m['cpu']} x{m['cores']}, load average {m['load_avg_start']:.1f} -> {m['load_avg_end']:.1f} "
         "(shared box). Engine, shards and Serve on the same cores; ratios are remote / in-engine in the same window "
         f"(decode: medians over {_repeats(res)} rounds, peers in "
         "alternating order, each ratio against its own round's in-engine run).",
         "", "| layout | P | lookup T=1 ms (local / remote, +added) | lookup T=16 ms (local / remote, +added) | "
         "sent B/token/layer | received B/token/layer | " + " | ".join(f"decode {n} streams tok/s (local / remote, ratio)"
                                                                       for n in streams) + " | same greedy tokens |",
         "|---|---|---|---|---|---|" + "---|" * len(streams) + "---|"]
    for r in res["plans"]:
        a, b = r["T1"], r["T16"]
        cells = [f"{r[f'decode_{n}']['local_tok_s']:.1f} / {r[f'decode_{n}']['remote_tok_s']:.1f} "
                 f"({r[f'decode_{n}']['ratio']:.2f}x)" for n in streams]
        same = all(r[f"decode_{n}"]["same_tokens"] for n in streams)
        L.append(f"| {r['layout']} | {r['P']} | {a['local_ms']:.2f} / {a['remote_ms']:.2f} (+{a['added_ms']:.2f}) | "
                 f"{b['local_ms']:.2f} / {b['remote_ms']:.2f} (+{b['added_ms']:.2f}) | {b['sent_B_per_token']:.0f} | "
                 f"{b['recv_B_per_token']:.0f} | " + " | ".join(cells) + f" | {'yes' if same else 'NO'} |")
    if res["scaling"]:
        L += ["", "Shard-replica scaling (columns, P = 1; closed loop of C concurrent lookups of one prefill-sized step):",
              "", "| replicas | C | lookups/s | tokens/s | p50 ms | p99 ms | in flight (rate x latency) | failed |",
              "|---|---|---|---|---|---|---|---|"]
        for s in res["scaling"]:
            L.append(f"| {s['replicas']} | {s['concurrency']} | {s['lookups_s']:.1f} | {s['tokens_s']:.0f} | "
                     f"{s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['in_flight']:.2f} | {s['failed']} |")
    return "\n".join(L) + "\n"


def plot(res: dict, streams: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = [f"{r['layout'][:3]} P={r['P']}" for r in res["plans"]]
    x = range(len(labels))
    for k, T in enumerate((1, 16)):
        ax[0].bar([i + 0.4 * k for i in x], [r[f"T{T}"]["added_ms"] for r in res["plans"]], 0.4, label=f"T={T}")
    ax[0].set_xticks([i + 0.2 for i in x], labels, rotation=30)
    ax[0].set_ylabel("ms added per layer-step lookup")
    ax[0].set_title("latency added by remote shards")
    ax[0].legend()
    bars = [(f"{n} streams", [r[f"decode_{n}"]["ratio"] for r in res["plans"]]) for n in streams]
    width = 0.8 / len(bars)
    for k, (label, ys) in enumerate(bars):
        ax[1].bar([i + width * k for i in x], ys, width, label=label)
    ax[1].axhline(0.9, ls="--", c="gray")
    ax[1].axhline(0.8, ls=":", c="gray")
    ax[1].set_xticks([i + 0.2 for i in x], labels, rotation=30)
    ax[1].set_ylabel("decode tok/s, remote / in-engine")
    ax[1].set_title("decode throughput ratio (targets 0.9 / 0.8)")
    ax[1].legend()
    for n_rep in (1, 2):
        pts = [s for s in res["scaling"] if s["replicas"] == n_rep]
        if pts:
            ax[2].plot([s["concurrency"] for s in pts], [s["lookups_s"] for s in pts], "o-", label=f"{n_rep} replica(s)")
    ax[2].set_xlabel("concurrent lookups C")
    ax[2].set_ylabel("lookups/s")
    ax[2].set_title("shard-replica scaling (columns, P=1)")
    ax[2].legend()
    fig.suptitle(f"memory shards, {res['meta']['cpu']} x{res['meta']['cores']} (shared)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    raise SystemExit(main())
