"""Where a memory-shard message's time goes (issue 17): per-hop timestamps and CPU per message.

    flock /tmp/memserve-ray.lock flock /tmp/memserve-bench.lock .venv/bin/python bench/memory_shard_hops.py \\
        --model /tmp/smol_mem512

One local Ray Serve, the columns shards of P = 1 and P = 3 (a subclass of MemoryShard whose lookup also
returns its own entry/exit times: CLOCK_MONOTONIC is one clock for every process of a host), and one
decode-sized layer-step (T tokens x K pairs) sent repeatedly, one at a time, by these paths:
  * "router thread, sync lookup": Serve's default for a handle used from a thread without an asyncio
    loop (the engine thread): `.remote()` hands the call to Serve's router thread, `.result()` waits
    on it there; the replica runs the sync method in its thread pool (the path before this change);
  * "call loop, async lookup": deploy/remote_value_store.py's CallLoop (the handles' routers run on
    one loop thread, the P calls leave from one coroutine, one hop back) and the shard's inline async
    lookup (deploy/memory_shards.py);
  * "Ray actor call": the same shard class as a plain Ray actor, `ray.get(actor.lookup.remote())`:
    the floor of Ray's own transport, without Serve's router and request path.
Per message (P = 1, medians): issue = time in `.remote()`; to replica = send -> replica entry; work =
the bag; back = replica exit -> answer in the caller; and CPU seconds per message of the caller's
process (all its threads) and of the shard processes, idle CPU over an equal idle time subtracted.
Writes bench/results/memory_shard_hops.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a memory-layer model dir (memserve init-memory)")
    ap.add_argument("--calls", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "memory_shard_hops"))
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from memserve.deploy.app import SERVE_ENV

    for k, v in SERVE_ENV.items():  # before ray.serve is imported: its constants read them once
        os.environ.setdefault(k, v)
    import ray
    import torch
    from memserve.deploy.app import init_ray
    from memserve.deploy.memory_shards import MemoryShard, load_specs, shard_memory
    from memserve.deploy.remote_value_store import CallLoop, on_call_loop
    from ray import serve
    from ray.serve.handle import DeploymentHandle

    sys_cpu = os.cpu_count()
    torch.set_num_threads(1)

    class Timed(MemoryShard):
        def lookup_sync(self, i, w):
            t_in = time.monotonic()
            return self.bag(i, w), t_in, time.monotonic()

        async def lookup_async(self, i, w):
            t_in = time.monotonic()
            return self.bag(i, w), t_in, time.monotonic()

        def cpu(self):
            return time.process_time()

    init_ray(num_cpus=sys_cpu, log_to_driver=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    plans, K = {}, None
    try:
        for P in (1, 3):
            shard_memory(args.model, P, "columns")
            (specs,) = load_specs(args.model, P, "columns").values()
            for s in specs:
                d = serve.deployment(Timed, name=s.name, max_ongoing_requests=64,
                                     ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}})
                serve.run(d.bind(s.to_dict()), name=s.name, route_prefix=None, blocking=False)
            plans[P] = specs
        for specs in plans.values():
            for s in specs:
                DeploymentHandle(s.name, s.name).info.remote().result(timeout_s=300)
        rows = plans[1][0].rows
        cfg = json.loads((Path(args.model) / "config.json").read_text())["memory_layers"]
        K = cfg["heads"] * cfg["knn"]
        thread_h = {P: [DeploymentHandle(s.name, s.name) for s in specs] for P, specs in plans.items()}
        for hs in thread_h.values():
            for h in hs:
                h._init(_run_router_in_separate_loop=True)
        loop_h = {P: [on_call_loop(DeploymentHandle(s.name, s.name)) for s in specs] for P, specs in plans.items()}
        actor = ray.remote(num_cpus=0, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})(Timed).remote(plans[1][0].to_dict())
        ray.get(actor.info.remote())
        cpu_h = [DeploymentHandle(s.name, s.name) for specs in plans.values() for s in specs]

        def shard_cpu():
            return sum(h.cpu.remote().result(timeout_s=30) for h in cpu_h) + ray.get(actor.cpu.remote())

        def via_thread(P):
            def call(i, w):
                rs = [h.lookup_sync.remote(i, w) for h in thread_h[P]]
                t1 = time.monotonic()
                return t1, [r.result(timeout_s=30) for r in rs]
            return call

        def via_loop(P):
            async def fan(i, w):
                return await asyncio.gather(*[h.lookup_async.remote(i, w) for h in loop_h[P]])

            def call(i, w):
                fut = CallLoop.run(fan(i, w))
                t1 = time.monotonic()
                return t1, fut.result(timeout=30)
            return call

        def via_actor(i, w):
            ref = actor.lookup_sync.remote(i, w)
            t1 = time.monotonic()
            return t1, [ray.get(ref)]

        rng = np.random.default_rng(0)
        paths = [("router thread, sync lookup", 1, via_thread(1)), ("call loop, async lookup", 1, via_loop(1)),
                 ("Ray actor call", 1, via_actor), ("router thread, sync lookup", 3, via_thread(3)),
                 ("call loop, async lookup", 3, via_loop(3))]
        out = []
        for rnd in range(args.rounds):
            for name, P, call in paths:
                hops, lat = [], []
                t_start, c0, r0 = time.monotonic(), time.process_time(), shard_cpu()
                for c in range(args.calls + 5):
                    i = rng.integers(0, rows, (args.tokens, K)).astype(np.int32)
                    w = rng.random((args.tokens, K), dtype=np.float32)
                    t0 = time.monotonic()
                    t1, answers = call(i, w)
                    t2 = time.monotonic()
                    if c >= 5:
                        lat.append(t2 - t0)
                        a = answers[0]  # P = 1: the hops of the one message
                        hops.append((t1 - t0, a[1] - t0, a[2] - a[1], t2 - a[2]))
                n = args.calls + 5
                busy_cpu, busy_shard = time.process_time() - c0, shard_cpu() - r0
                dt = time.monotonic() - t_start
                c1, r1 = time.process_time(), shard_cpu()
                time.sleep(dt)  # the same time idle: background CPU (metrics, health checks) to subtract
                idle_cpu, idle_shard = time.process_time() - c1, shard_cpu() - r1
                h = [1e3 * statistics.median(x) for x in zip(*hops)]
                r = {"round": rnd, "path": name, "P": P, "p50_ms": 1e3 * statistics.median(lat),
                     "p90_ms": 1e3 * sorted(lat)[int(0.9 * len(lat))],
                     "issue_ms": h[0], "to_replica_ms": h[1], "work_ms": h[2], "back_ms": h[3],
                     "caller_cpu_ms": 1e3 * (busy_cpu - idle_cpu) / n, "shard_cpu_ms": 1e3 * (busy_shard - idle_shard) / n,
                     "load": os.getloadavg()[0]}
                print(json.dumps(r), flush=True)
                out.append(r)
    finally:
        ray.shutdown()
    from host_info import cpu_name  # bench/ is sys.path[0] when run as a script

    meta = {"cpu": cpu_name(), "cores": sys_cpu, "model": args.model, "K": K, "tokens": args.tokens,
            "calls": args.calls}
    res = {"meta": meta, "rows": out}
    o = Path(args.out)
    o.parent.mkdir(parents=True, exist_ok=True)
    o.with_suffix(".json").write_text(json.dumps(res, indent=1))
    o.with_suffix(".md").write_text(render_md(res))
    print(o.with_suffix(".md").read_text())
    return 0


def render_md(res: dict) -> str:
    m = res["meta"]
    L = [f"One layer-step lookup ({m['tokens']} token x K = {m['K']} pairs, columns shards of {m['model']}), "
         f"{m['calls']} calls per row, one at a time; CPU {m['cpu']} x{m['cores']}, shared box (load in the last "
         "column). Hops are medians of the P = 1 message (for P = 3: the first shard's). CPU per message: the "
         "caller process (all threads) and the shard processes, idle CPU over an equal idle time subtracted.",
         "", "| round | path | P | p50 ms | p90 ms | issue | to replica | work | back | caller CPU ms | shard CPU ms | load |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        L.append(f"| {r['round']} | {r['path']} | {r['P']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['issue_ms']:.2f} | "
                 f"{r['to_replica_ms']:.2f} | {r['work_ms']:.2f} | {r['back_ms']:.2f} | {r['caller_cpu_ms']:.2f} | "
                 f"{r['shard_cpu_ms']:.2f} | {r['load']:.1f} |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
