"""Diagnostic (not in CI; issue 18 item 4): where the serving path's per-token time goes.

One Serve app (topology from argv) and the in-process AsyncLLMEngine, both with an engine class that
times every engine step (wall, and the engine thread's own CPU). First 10 s idle: CPU of each
process's threads at rest (Ray's background work, which is there whether tokens flow or not). Then
rounds of one wave per path (N streams x T tokens, order alternating): client ITL p50 per wave, and
for each path the engine step wall / thread-CPU p50 and the CPU per generated token of every thread
group (/proc/PID/task/*/stat, grouped by thread name) of the proxy, ingress replica, engine replica
and this process (the gRPC client; in-process: engine + client). `pyspy`: py-spy records the Serve
processes during the last served wave (raw flame files in /tmp/serving_hops_ROLE.txt).

    flock /tmp/memserve-ray.lock .venv/bin/python bench/serving_hops.py ingress 8 32 4 [pyspy]

Findings it gave are in deploy/README.md (Serving benchmark).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from memserve.runtime.async_engine import AsyncLLMEngine  # noqa: E402


class TimedAsyncEngine(AsyncLLMEngine):
    """AsyncLLMEngine whose engine steps are timed: (start, end, thread cpu, n outputs)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.steps: list = []
        step = self.engine.step

        def timed():
            t0, c0 = time.perf_counter(), time.thread_time()
            out = step()
            self.steps.append((t0, time.perf_counter(), time.thread_time() - c0, len(out)))
            return out

        self.engine.step = timed

    def model_info(self) -> dict:
        info = dict(super().model_info())
        info["steps"] = json.dumps(self.steps)
        self.steps = []
        return info


def thread_cpu(pid: int) -> dict:
    """(thread name -> user+system seconds) of every thread of pid, from /proc."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                st = f.read()
        except OSError:
            continue
        name = st[st.index("(") + 1:st.rindex(")")]
        fields = st[st.rindex(")") + 2:].split()
        key = re.sub(r"[0-9]+$", "#", name)
        out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def step_stats(steps):
    walls = [e - s for s, e, _, n in steps if n]
    cpus = [c for _, _, c, n in steps if n]
    gaps = [steps[i + 1][0] - steps[i][1] for i in range(len(steps) - 1) if steps[i + 1][0] - steps[i][1] < 0.5]
    med = lambda xs: 1e3 * statistics.median(xs) if xs else float("nan")  # noqa: E731
    return f"step wall p50 {med(walls):.1f} ms, thread cpu p50 {med(cpus):.1f} ms, gap p50 {med(gaps):.2f} ms ({len(walls)} steps)"


def main():
    topo, n, max_tokens, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    pyspy = "pyspy" in sys.argv[5:]
    import grpc
    import ray
    from memserve.deploy import memserve_pb2 as pb
    from memserve.deploy import memserve_pb2_grpc as pbg
    from memserve.deploy.app import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT, init_ray, serve_actor_pids, start
    from memserve.deploy.config import AppConfig
    from memserve.runtime.sampling import SamplingParams
    from ray import serve
    from serving import make_prompt, pct
    from serving_testlib import free_port

    port = free_port()
    init_ray(num_cpus=os.cpu_count(), log_to_driver=False, logging_level="ERROR")
    try:
        cfg = AppConfig(model="default", engine_args={"max_num_seqs": 16}, max_waiting=256, num_replicas=1,
                        topology=topo, app_name="probe", engine_cls="serving_hops:TimedAsyncEngine",
                        env_vars={"PYTHONPATH": f"{HERE}:{HERE.parent / 'tests'}"})
        start(cfg, grpc_port=port, http_port=free_port())
        pids = {"proxy": next(iter(serve_actor_pids().values())),
                "engine": next(iter(serve_actor_pids("probe", ENGINE_DEPLOYMENT).values()))}
        if topo == "ingress":
            pids["ingress"] = next(iter(serve_actor_pids("probe", INGRESS_DEPLOYMENT).values()))
        print("pids", pids, flush=True)

        async def amain():
            engine = TimedAsyncEngine("default", max_waiting=256, max_num_seqs=16)
            md = (("application", "probe"),)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pbg.MemServeStub(ch)

                async def wave(kind):
                    gaps = []

                    async def one(i):
                        last = None
                        if kind == "in-process":
                            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
                            it = engine.generate(make_prompt(i, 24), params, uuid.uuid4().hex)
                            get = lambda o: len(o.new_token_ids)  # noqa: E731
                        else:
                            req = pb.GenerateRequest(prompt=make_prompt(i, 24), sampling=pb.SamplingParams(
                                max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
                            it = stub.Generate(req, timeout=600, metadata=md)
                            get = lambda m: len(m.token_ids)  # noqa: E731
                        async for o in it:
                            if get(o):
                                now = time.perf_counter()
                                if last is not None:
                                    gaps.append(now - last)
                                last = now
                    await asyncio.gather(*(one(i) for i in range(n)))
                    return gaps

                await wave("in-process")
                await wave("served")
                pids["client"] = os.getpid()
                before = {r_: thread_cpu(p_) for r_, p_ in pids.items()}
                await asyncio.sleep(10.0)
                after = {r_: thread_cpu(p_) for r_, p_ in pids.items()}
                for r_ in pids:
                    for t_, v_ in sorted(after[r_].items()):
                        d_ = v_ - before[r_].get(t_, 0.0)
                        if d_ > 0:
                            print(f"  idle 10 s: {r_:>8} {t_:<28} {100 * d_ / 10:5.2f} % of a core", flush=True)
                await stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md)
                engine.steps = []
                res = {"in-process": ([], []), "served": ([], [])}
                cpu = {"in-process": {}, "served": {}}
                ntok = {"in-process": 0, "served": 0}
                spies = []
                for r in range(rounds):
                    if pyspy and r == rounds - 1:
                        for role, pid in pids.items():
                            spies.append(subprocess.Popen(
                                [str(HERE.parent / ".venv/bin/py-spy"), "record", "-p", str(pid), "-d", "8", "-r", "200",
                                 "-f", "raw", "-o", f"/tmp/serving_hops_{role}.txt", "--threads"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                        await asyncio.sleep(1.0)
                    for kind in (("in-process", "served") if r % 2 == 0 else ("served", "in-process")):
                        if pyspy and r == rounds - 1 and kind == "in-process":
                            continue
                        before = {r_: thread_cpu(p_) for r_, p_ in pids.items()}
                        gaps = await wave(kind)
                        after = {r_: thread_cpu(p_) for r_, p_ in pids.items()}
                        ntok[kind] += n * max_tokens
                        for r_ in pids:
                            for t_, v_ in after[r_].items():
                                k_ = (r_, t_)
                                cpu[kind][k_] = cpu[kind].get(k_, 0.0) + v_ - before[r_].get(t_, 0.0)
                        res[kind][0].extend(gaps)
                        if kind == "in-process":
                            steps = engine.steps
                            engine.steps = []
                        else:
                            info = await stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md)
                            steps = json.loads(info.extra["steps"])
                        res[kind][1].extend(steps)
                        # steps with outputs in the wave, and outputs of its first steps: a wave whose requests
                        # reach the engine spread out starts with a step for the first few alone
                        busy = [x for x in steps if x[3]]
                        print(f"round {r} {kind}: ITL p50 {1e3 * pct(gaps, 50):.1f} ms, {len(busy)} steps, first "
                              f"{[x[3] for x in busy[:3]]} outputs, {1e3 * sum(e - s_ for s_, e, _, _ in busy[:2]):.0f} ms",
                              flush=True)
                for s in spies:
                    s.wait()
                for kind, (gaps, steps) in res.items():
                    print(f"{kind}: ITL p50 {1e3 * pct(gaps, 50):.1f} ms; {step_stats(steps)}")
                    for k_, v_ in sorted(cpu[kind].items(), key=lambda kv: -kv[1]):
                        if v_ > 0:
                            print(f"    {k_[0]:>8} {k_[1]:<28} {1e3 * v_ / max(1, ntok[kind]):6.2f} ms CPU per token")
            engine.shutdown()

        asyncio.run(amain())
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    threading.excepthook = lambda a: None
    main()
