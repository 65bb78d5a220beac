"""Soak (issue 20 "Show"): many minutes of mixed gRPC load with injected faults; does anything leak?

    memserve bench soak                                  # default model, 10 min, 16 streams
    memserve bench soak --minutes 2 --streams 4 --model /path/to/hf     # a short look
    memserve bench soak --serve                          # the same load on a local real Ray Serve

The server is a child process (`soak.py serve`): the default model's AsyncLLMEngine + EngineWorker
+ MemServeIngress's gRPC methods on a plain grpc.aio server (tests/deploy/grpc_local.py), without
Ray, so its RSS is the whole server's and nothing else's (real Serve spreads it over a proxy,
an ingress and a replica process, too heavy for the 2-core box this was run on). The child writes
a JSON line per second: RSS, engine stats (free KV blocks, memory-tier bytes, sessions).

`--serve`: the server is the real serving plane instead (bench/_soak_serve.py: a local Ray cluster,
Serve's gRPC proxy -> MemServeIngress -> one MemServeEngine replica, deployed as `memserve serve`
does). Its child samples the RSS of the engine replica (the growth checked), the ingress replica
and the proxy once per second (pids from Ray's actor table) and reads the engine stats through
GetModelInfo; an engine replica that changes pid during the run is a restart, counted as an error.
Outputs are named soak_serve.* by default.

The load: `--streams` client tasks over one real gRPC channel, each looping until the time is up
over a weighted mix: plain generations (sampled or greedy), generations cancelled by the client
after a few tokens, generations with a 30 ms deadline (both injected faults), session rounds
(Ingest a document, Generate in the session twice, GetSession; DeleteSession even when a step
failed) and GetModelInfo. Every other RPC has a `--timeout` deadline (600 s: errors and leaks are the
point here, not latency).
An error is any status other than OK, except CANCELLED / DEADLINE_EXCEEDED on an injected fault.

At the end (load stopped, server idle): free KV blocks, memory-tier bytes and active sessions must
be back to their values before the load. RSS growth: least-squares slope (MiB/min) of the RSS
samples after the warm-up (`--warmup-frac` of the run). Outputs bench/results/soak.json,
soak.md (the table) and soak.png (RSS over time); with --serve soak_serve.json/.md/.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORDS = ("memory river lantern orbit quiet copper meadow signal harbor violet engine summer paper glacier "
         "whisper canyon").split()
MIX = (("generate", 50), ("cancel", 15), ("deadline", 5), ("session", 20), ("info", 10))


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------- server (child process)
def serve(a) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "tests" / "deploy"))
    from grpc_local import make_ingress, start_server
    from memserve.deploy.worker import EngineWorker, _plain
    from memserve.runtime.async_engine import AsyncLLMEngine
    from serving_testlib import LocalClient

    async def main():
        engine = AsyncLLMEngine(a.model, progress=False, max_waiting=256)
        worker = EngineWorker(engine, model_name=a.model, replica="soak")
        ingress = make_ingress(LocalClient(worker), unavailable_timeout_s=30.0)
        server, addr = await start_server(ingress)
        out = open(a.stats, "a", buffering=1)
        out.write(json.dumps({"addr": addr, "t": time.time()}) + "\n")
        try:
            while True:
                st = _plain(engine.stats())
                out.write(json.dumps({"t": time.time(), "rss_mib": _rss_mib(), "stats": st}) + "\n")
                await asyncio.sleep(1.0)
        finally:
            await server.stop(1)
            engine.shutdown()

    asyncio.run(main())
    return 0


# ---------------------------------------------------------------- load (parent)
def prompt(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Load:
    def __init__(self, stub, pb, grpc, seed: int, timeout_s: float):
        self.stub, self.pb, self.grpc = stub, pb, grpc
        self.timeout_s = timeout_s
        self.rng = random.Random(seed)
        self.ops = Counter()
        self.errors = Counter()      # (op, code) outside injected faults
        self.injected = Counter()    # (op, code) of injected faults
        self.tokens = 0

    def _sampling(self, n):
        pb, r = self.pb, self.rng
        if r.random() < 0.5:
            return pb.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        return pb.SamplingParams(max_tokens=n, temperature=0.8, top_p=0.95, seed=r.randrange(1 << 30))

    async def _gen(self, req, timeout=None, cancel_after=None) -> str:
        timeout = timeout or self.timeout_s
        call = self.stub.Generate(req, timeout=timeout)
        got, outcome = 0, "OK"
        async for m in call:
            got += len(m.token_ids)
            if cancel_after is not None and got >= cancel_after:
                call.cancel()
                outcome = "client cancel"
                break
        self.tokens += got
        return outcome

    async def _session(self, sid: str) -> None:
        pb, r = self.pb, self.rng
        try:
            prog = [m async for m in self.stub.Ingest(pb.IngestRequest(session_id=sid, text=prompt(r, r.randint(50, 300))),
                                                      timeout=self.timeout_s)]
            assert prog and prog[-1].done, "ingest did not report done"
            for _ in range(2):
                await self._gen(pb.GenerateRequest(prompt=" " + prompt(r, 6), session_id=sid,
                                                   sampling=self._sampling(r.randint(4, 16))))
            await self.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=self.timeout_s)
        finally:  # a failed round still deletes what it made (NOT_FOUND if the ingest never finished)
            try:
                await self.stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=self.timeout_s)
            except self.grpc.aio.AioRpcError as e:
                if e.code() != self.grpc.StatusCode.NOT_FOUND:
                    raise

    async def one(self, sid_base: str, k: int) -> None:
        pb, r, grpc = self.pb, self.rng, self.grpc
        op = r.choices([m for m, _ in MIX], weights=[w for _, w in MIX])[0]
        self.ops[op] += 1
        injected = op in ("cancel", "deadline")
        outcome = "OK"
        try:
            if op == "generate":
                await self._gen(pb.GenerateRequest(prompt=prompt(r, r.randint(4, 60)), sampling=self._sampling(r.randint(4, 32))))
            elif op == "cancel":
                outcome = await self._gen(pb.GenerateRequest(prompt=prompt(r, r.randint(4, 60)), sampling=self._sampling(64)),
                                cancel_after=r.randint(1, 8))
            elif op == "deadline":
                await self._gen(pb.GenerateRequest(prompt=prompt(r, r.randint(4, 60)), sampling=self._sampling(64)),
                                timeout=0.03)
            elif op == "session":
                await self._session(f"{sid_base}-{k}")
            else:
                await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout_s)
            if injected:
                self.injected[(op, outcome)] += 1
        except grpc.aio.AioRpcError as e:
            code = e.code().name
            if injected and code in ("CANCELLED", "DEADLINE_EXCEEDED"):
                self.injected[(op, code)] += 1
            else:
                self.errors[(op, code, (e.details() or "")[:120])] += 1
        except asyncio.CancelledError:
            if not injected:
                raise
            self.injected[(op, "CANCELLED")] += 1
        except Exception as e:  # noqa: BLE001 - counted, the soak goes on
            self.errors[(op, type(e).__name__, str(e)[:120])] += 1


async def drive(addr: str, a) -> Load:
    import grpc
    from memserve.deploy import memserve_pb2 as pb
    from memserve.deploy import memserve_pb2_grpc as pbg

    async with grpc.aio.insecure_channel(addr) as ch:
        load = Load(pbg.MemServeStub(ch), pb, grpc, a.seed, a.timeout)
        end = time.time() + 60 * a.minutes

        async def worker(i):
            k = 0
            while time.time() < end:
                await load.one(f"soak-{i}", k)
                k += 1

        await asyncio.gather(*(worker(i) for i in range(a.streams)))
    return load


def read_stats(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def slope_mib_per_min(ts, ys) -> float:
    n = len(ts)
    if n < 2:
        return float("nan")
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    return 60 * sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var if var else float("nan")


def _tier_bytes(st: dict) -> int:
    """Bytes of the KV memory's tiers (all but the paged cache's "device")."""
    return sum(int(v) for k, v in (st.get("kv_memory_bytes") or {}).items() if k != "device")


def summarize(samples: list[dict], base: dict, t_load: tuple[float, float], final: dict, load: Load, a) -> dict:
    t0 = t_load[0]
    warm_end = t0 + a.warmup_frac * (t_load[1] - t0)
    after = [s for s in samples if warm_end <= s["t"] <= t_load[1]]
    bs, fs = base["stats"], final["stats"]
    return {
        "model": a.model, "streams": a.streams, "minutes": a.minutes, "seed": a.seed,
        "ops": dict(load.ops), "tokens": load.tokens,
        "errors_outside_injected": sum(load.errors.values()),
        "errors": {" | ".join(k): v for k, v in load.errors.items()},
        "injected": {" | ".join(k): v for k, v in load.injected.items()},
        "free_blocks": [bs["num_free_blocks"], fs["num_free_blocks"], fs["num_total_blocks"]],
        "kv_memory_bytes": [bs.get("kv_memory_bytes", {}), fs.get("kv_memory_bytes", {})],
        "sessions_active": [bs.get("sessions_active", 0), fs.get("sessions_active", 0)],
        "running_waiting_after": [fs["num_running"], fs["num_waiting"]],
        "peak_during_load": {"blocks_in_use": max(s["stats"]["num_total_blocks"] - s["stats"]["num_free_blocks"] for s in samples),
                             "memory_tier_bytes": max(_tier_bytes(s["stats"]) for s in samples),
                             "sessions_active": max(s["stats"].get("sessions_active", 0) for s in samples)},
        "rss_mib": [base["rss_mib"], max(s["rss_mib"] for s in samples), final["rss_mib"]],
        "rss_growth_mib_per_min": slope_mib_per_min([s["t"] for s in after], [s["rss_mib"] for s in after]),
        "warmup_s": warm_end - t0,
        **(_by_role(samples, after, base, final) if "rss_by_role" in base else {}),
    }


def _by_role(samples, after, base, final) -> dict:
    """--serve: RSS start / peak / end and growth of each Serve process, and engine replica restarts
    (distinct engine pid sets seen, minus one)."""
    roles = list(base["rss_by_role"])
    return {
        "rss_by_role": {r: [base["rss_by_role"][r], max(s["rss_by_role"][r] for s in samples), final["rss_by_role"][r],
                            slope_mib_per_min([s["t"] for s in after], [s["rss_by_role"][r] for s in after])]
                        for r in roles},
        "engine_replica_restarts": len({json.dumps(s["pids"]["engine"], sort_keys=True) for s in [base, *samples, final]}) - 1,
        "max_stats_age_s": max(s.get("stats_age_s", 0) for s in samples),
    }


def table(r: dict) -> str:
    fb, kb, sa, rss, pk = r["free_blocks"], r["kv_memory_bytes"], r["sessions_active"], r["rss_mib"], r["peak_during_load"]
    ops = ", ".join(f"{k} {v}" for k, v in sorted(r["ops"].items()))
    rows = [
        ("load", f"{r['minutes']:g} min, {r['streams']} concurrent streams, model {r['model']}"),
        ("requests", f"{sum(r['ops'].values())} ({ops}); {r['tokens']} tokens streamed"),
        ("errors outside injected faults", str(r["errors_outside_injected"])
         + ("" if not r["errors"] else " (" + "; ".join(f"{k}: {v}" for k, v in r["errors"].items()) + ")")),
        ("injected faults (outcome)", "; ".join(f"{k}: {v}" for k, v in sorted(r["injected"].items()))),
        ("free KV blocks before / after / total", f"{fb[0]} / {fb[1]} / {fb[2]}"),
        ("memory-tier bytes before / after", f"{kb[0]} / {kb[1]}"),
        ("active sessions before / after", f"{sa[0]} / {sa[1]}"),
        ("requests running / waiting after", " / ".join(map(str, r["running_waiting_after"]))),
        ("peak during load: KV blocks in use / memory-tier bytes / sessions",
         f"{pk['blocks_in_use']} / {pk['memory_tier_bytes']} / {pk['sessions_active']}"),
        ("server RSS MiB start / peak / end" if "rss_by_role" not in r else "engine replica RSS MiB start / peak / end",
         f"{rss[0]:.0f} / {rss[1]:.0f} / {rss[2]:.0f}"),
        (f"RSS growth after {r['warmup_s'] / 60:.1f} min warm-up", f"{r['rss_growth_mib_per_min']:+.2f} MiB/min"),
    ]
    if "rss_by_role" in r:
        rows += [(f"{role} RSS MiB start / peak / end, growth after warm-up",
                  f"{v[0]:.0f} / {v[1]:.0f} / {v[2]:.0f}, {v[3]:+.2f} MiB/min") for role, v in r["rss_by_role"].items()]
        rows.append(("engine replica restarts", str(r["engine_replica_restarts"])))
    return "| soak | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"


def plot(samples: list[dict], t_load, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = t_load[0]
    xs = [(s["t"] - t0) / 60 for s in samples]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    if "rss_by_role" in samples[0]:
        for role in samples[0]["rss_by_role"]:
            ax.plot(xs, [s["rss_by_role"][role] for s in samples], lw=1.2, label=f"{role} RSS (MiB)")
    else:
        ax.plot(xs, [s["rss_mib"] for s in samples], lw=1.2, label="server RSS (MiB)")
    ax.axvspan(0, (t_load[1] - t0) / 60, color="0.92", label="load")
    ax.set_xlabel("minutes since load start")
    ax.set_ylabel("RSS MiB")
    ax2 = ax.twinx()
    ax2.plot(xs, [s["stats"]["num_total_blocks"] - s["stats"]["num_free_blocks"] for s in samples], lw=0.8,
             color="tab:orange", label="KV blocks in use")
    ax2.set_ylabel("KV blocks in use")
    fig.legend(loc="upper right", fontsize=8)
    ax.set_title("memserve soak" + (" on Ray Serve" if "rss_by_role" in samples[0] else "")
                 + ": server RSS and KV blocks over time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(a) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    a.name = a.name or ("soak_serve" if a.serve else "soak")
    stats = RESULTS / f"{a.name}_stats.jsonl"
    stats.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "serve-ray" if a.serve else "serve", "--model", a.model, "--stats", str(stats)]
    if a.serve:
        cmd += ["--threads", str(a.threads), "--timeout", str(a.timeout)]
    child = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
    try:
        deadline = time.time() + 900  # Ray + Serve + the default model on a loaded box: minutes
        while time.time() < deadline:
            if child.poll() is not None:
                raise SystemExit(f"server exited with {child.returncode}")
            if stats.exists() and len(read_stats(stats)) >= 3:
                break
            time.sleep(1)
        lines = read_stats(stats)
        addr = lines[0]["addr"]
        base = lines[-1]
        print(f"server up at {addr}; RSS {base['rss_mib']:.0f} MiB; load for {a.minutes} min", flush=True)
        t_start = time.time()
        load = asyncio.run(drive(addr, a))
        t_end = time.time()

        def idle(s):
            st = s["stats"]
            return st["num_running"] == 0 and st["num_waiting"] == 0

        settle = time.time() + 180
        final = read_stats(stats)[-1]
        while time.time() < settle and not (idle(final) and final["stats"]["num_free_blocks"] == base["stats"]["num_free_blocks"]):
            time.sleep(1)
            final = read_stats(stats)[-1]
        time.sleep(2)
        final = read_stats(stats)[-1]
        samples = [s for s in read_stats(stats)[1:] if s["t"] >= t_start - 5]
    finally:
        child.terminate()
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
    r = summarize(samples, base, (t_start, t_end), final, load, a)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(r, indent=1) + "\n")
    md = table(r)
    (RESULTS / f"{a.name}.md").write_text(md)
    plot(samples, (t_start, t_end), RESULTS / f"{a.name}.png")
    print(md)
    ok = (r["errors_outside_injected"] == 0 and r["running_waiting_after"] == [0, 0] and r["free_blocks"][0] == r["free_blocks"][1]
          and r["kv_memory_bytes"][0] == r["kv_memory_bytes"][1] and r["sessions_active"][0] == r["sessions_active"][1]
          and r.get("engine_replica_restarts", 0) == 0)
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("serve", help="(internal) the server child process")
    s.add_argument("--model", default="default")
    s.add_argument("--stats", required=True)
    s = sub.add_parser("serve-ray", help="(internal) the real-Serve server child process (bench/_soak_serve.py)")
    s.add_argument("--model", default="default")
    s.add_argument("--stats", required=True)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--model", default="default")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="deadline of every non-injected RPC (the soak counts errors and leaks, not latency; on the "
                        "shared 2-core box 120 s deadlines expired under 16 streams)")
    p.add_argument("--warmup-frac", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve", action="store_true", help="against a local real Ray Serve app (bench/_soak_serve.py)")
    p.add_argument("--name", default=None, help="output name under bench/results/ (soak, or soak_serve with --serve)")
    a = p.parse_args(argv)
    if a.cmd == "serve-ray":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _soak_serve import serve_ray

        return serve_ray(a)
    return serve(a) if a.cmd == "serve" else run(a)


if __name__ == "__main__":
    raise SystemExit(main())
