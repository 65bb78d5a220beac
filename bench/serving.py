"""Serving overhead: the in-process async engine vs the same engine behind gRPC + Ray Serve, in both
topologies the app supports (and, with `--api http`, behind the OpenAI-compatible HTTP API too).

    memserve bench serving                         # default model, 1/4/8/16 streams, ingress + direct
    memserve bench serving --model /path/to/hf --streams 1,8 --max-tokens 32
    memserve bench serving --topology ingress --api http --streams 1,8   # + HTTP (SSE), same run

For each concurrency N, N streams start together (distinct prompts, greedy, ignore_eos so every
stream generates exactly --max-tokens tokens). Measured on the client side: TTFT (send -> first
token), ITL, throughput (generated tokens / wall time of the waves), messages per token (1.0 = one
message per token; below 1 the server coalesced).

ITL is what the client waits between deliveries: one sample per message after a stream's first, the
time since that stream's previous message. A message carrying k tokens is ONE wait (k tokens became
visible after it), not k gaps of wait/k (that hid a coalesced stream's waits behind small numbers)
and not one wait plus k-1 zero gaps (zeros pull a percentile down); the first message's extra tokens
are in TTFT. In-process every item carries one token, so there it is the plain inter-token gap; a
served stream that coalesced shows longer waits, which is what its client saw.

Every path is up at once -- the in-process AsyncLLMEngine in this process and one Serve app per
topology (one engine replica each, same engine arguments, `ingress`: Serve's gRPC proxy -> ingress
deployment -> engine deployment; `direct`: proxy -> engine replica) -- and their waves alternate
(then in reverse order): one round = one wave of every path, back to back. Added ITL and the
tokens/s ratio are PAIRED: per round, the served wave's ITL p50 minus the in-process wave's of the
same round (tokens/s: their ratio); the table gives the median over rounds and, in brackets, the
range of the middle half (quartiles). Load drift on a shared machine moves both waves of a round
alike and drops out of the difference; a pooled p50 over all rounds (the old statistic, still in the
JSON) does not separate the two. What is left is load that changes WITHIN a round: with 8 rounds at
8 streams on 2 cores shared with other jobs (load average 4.5-7.4) the quartiles of the added ITL
spanned 19 ms (-11.5..+7.2 around a median of +3.2), so there a 3 ms change needs a quiet box or
several times more rounds (the median's error shrinks as 1/sqrt(rounds)).

CPU per token (psutil, user+system seconds of each process over the path's waves / tokens): the
in-process row counts this process (engine + client); a Serve row counts Serve's gRPC proxy, the
ingress replica (topology `ingress`) and the engine replica, and, separately, this process as the
gRPC client. On a machine where the engine uses every core, the serving processes' CPU is taken
from the engine: that is where the added latency comes from.

Results: a markdown table + JSON (+ a plot of ITL p50 and tokens/s vs streams) in bench/results/
(`--name`). Targets (issue 18 item 4): at 8 streams, gRPC + Ray adds <= 5 ms p50 ITL and keeps
>= 0.95x the in-process tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loaded by path (tests, `memserve bench`) too
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from host_info import cpu_name  # noqa: E402
from serving_testlib import free_port  # noqa: E402  (ports outside Ray's and the kernel's ranges)

PROMPT_WORDS = ("memory river lantern orbit quiet copper meadow signal harbor violet engine summer paper "
                "glacier whisper canyon").split()
RESULTS = Path(__file__).resolve().parent / "results"
TARGET_ADDED_ITL_MS, TARGET_RATIO = 5.0, 0.95


def make_prompt(i: int, words: int) -> str:
    return "Story %d: " % i + " ".join(PROMPT_WORDS[(i * 7 + k) % len(PROMPT_WORDS)] for k in range(words))


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


@dataclass
class Wave:
    mode: str
    streams: int
    ttft: list = field(default_factory=list)
    itl: list = field(default_factory=list)
    tokens: int = 0
    messages: int = 0
    wall_s: float = 0.0
    cpu_s: dict = field(default_factory=dict)  # process role -> CPU seconds over the wave
    rounds: list = field(default_factory=list)  # merged waves: [(ITL p50 s, tok/s)] of each round's wave

    def summary(self) -> dict:
        tok = max(1, self.tokens)
        return {"mode": self.mode, "streams": self.streams,
                "ttft_p50_ms": 1e3 * pct(self.ttft, 50), "ttft_p99_ms": 1e3 * pct(self.ttft, 99),
                "itl_p50_ms": 1e3 * pct(self.itl, 50), "itl_p95_ms": 1e3 * pct(self.itl, 95),
                "itl_p99_ms": 1e3 * pct(self.itl, 99),
                "tok_s": self.tokens / self.wall_s if self.wall_s else 0.0, "tokens": self.tokens,
                "msgs_per_token": self.messages / tok,
                "cpu_ms_per_token": {k: 1e3 * v / tok for k, v in self.cpu_s.items()},
                "rounds": [{"itl_p50_ms": 1e3 * i, "tok_s": t} for i, t in self.rounds]}


class Stream:
    def __init__(self, wave: Wave):
        self.wave, self.t0, self.last = wave, time.perf_counter(), None

    def on(self, n_tokens: int):
        """A message carrying n_tokens arrived (see the module doc: one ITL sample per message)."""
        if n_tokens <= 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self.wave.ttft.append(now - self.t0)
        else:
            self.wave.itl.append(now - self.last)
        self.last = now
        self.wave.tokens += n_tokens
        self.wave.messages += 1


class CpuMeter:
    """user+system CPU seconds of named processes (pids), read before and after a wave."""

    def __init__(self, pids: dict[str, int]):
        import psutil

        self.procs = {role: psutil.Process(pid) for role, pid in pids.items()}

    def read(self) -> dict[str, float]:
        out = {}
        for role, p in self.procs.items():
            t = p.cpu_times()
            out[role] = t.user + t.system
        return out

    async def measure(self, wave_coro) -> Wave:
        before = self.read()
        wave = await wave_coro
        after = self.read()
        wave.cpu_s = {k: after[k] - before[k] for k in before}
        return wave


async def run_wave(mode: str, n: int, one) -> Wave:
    wave = Wave(mode, n)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, Stream(wave)) for i in range(n)))
    wave.wall_s = time.perf_counter() - t0
    return wave


# ---- the three clients --------------------------------------------------------------------------

def inproc_path(engine, a, SamplingParams):
    async def one(i, st):
        params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
        async for out in engine.generate(make_prompt(i, a.prompt_words), params, uuid.uuid4().hex):
            st.on(len(out.new_token_ids))
    return lambda n: run_wave("in-process", n, one)


def grpc_path(stub, pb, a, app_name: str, label: str):
    md = (("application", app_name),)

    async def one(i, st):
        req = pb.GenerateRequest(prompt=make_prompt(i, a.prompt_words),
                                 sampling=pb.SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True))
        async for msg in stub.Generate(req, timeout=600, metadata=md):
            st.on(len(msg.token_ids))
    return lambda n: run_wave(label, n, one)


def _httpx():
    try:  # the openai package's own HTTP client (httpx2 for openai>=3)
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx


def http_path(client, a, prefix: str, label: str):
    url = prefix.rstrip("/") + "/v1/completions"

    async def one(i, st):
        body = {"model": a.model, "prompt": make_prompt(i, a.prompt_words), "max_tokens": a.max_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": True, "return_token_ids": True}
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    st.on(len(json.loads(line[6:])["choices"][0].get("token_ids") or ()))
    return lambda n: run_wave(label, n, one)


def _merge(waves: list[Wave]) -> Wave:
    """Repetitions of one (mode, streams): latencies pooled, throughput = total tokens / total time."""
    out = Wave(waves[0].mode, waves[0].streams)
    for w in waves:
        out.rounds.append((pct(w.itl, 50), w.tokens / w.wall_s if w.wall_s else 0.0))
        out.ttft += w.ttft
        out.itl += w.itl
        out.tokens += w.tokens
        out.messages += w.messages
        out.wall_s += w.wall_s
        for k, v in w.cpu_s.items():
            out.cpu_s[k] = out.cpu_s.get(k, 0.0) + v
    return out


def app_name_of(topology: str) -> str:
    return f"memserve_{topology}"


def run_all(a, engine_args) -> dict[str, list[Wave]]:
    """Every path live at once; waves alternate (forward, then reverse order, ...). Returns mode -> waves."""
    import grpc
    import ray
    from memserve.deploy import memserve_pb2 as pb
    from memserve.deploy import memserve_pb2_grpc as pbg
    from memserve.deploy.app import (
        ENGINE_DEPLOYMENT,
        INGRESS_DEPLOYMENT,
        build_app,
        init_ray,
        replica_grpc_targets,
        serve_actor_pids,
        start,
    )
    from memserve.deploy.config import AppConfig
    from memserve.runtime.async_engine import AsyncLLMEngine
    from memserve.runtime.sampling import SamplingParams
    from ray import serve

    port, http_port = free_port(), free_port()
    if a.plain_serve:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    else:
        init_ray(num_cpus=os.cpu_count(), log_to_driver=False, logging_level="ERROR")
    try:
        prefixes = {}
        for k, topo in enumerate(a.topology):
            cfg = AppConfig(model=a.model, engine_args=engine_args, max_waiting=256, num_replicas=1, topology=topo,
                            app_name=app_name_of(topo))
            prefixes[topo] = "/" if k == 0 else f"/{topo}"
            if k == 0:
                start(cfg, grpc_port=port, http_port=http_port, route_prefix=prefixes[topo])
            else:
                serve.run(build_app(cfg), name=cfg.app_name, route_prefix=prefixes[topo], blocking=False)
        proxy = next(iter(serve_actor_pids().values()))
        meters = {}
        for topo in a.topology:
            pids = {"proxy": proxy}
            if topo == "ingress":
                pids["ingress"] = next(iter(serve_actor_pids(app_name_of(topo), INGRESS_DEPLOYMENT).values()))
            pids["engine replica"] = next(iter(serve_actor_pids(app_name_of(topo), ENGINE_DEPLOYMENT).values()))
            pids["client"] = os.getpid()
            meters[topo] = CpuMeter(pids)
        self_meter = CpuMeter({"process": os.getpid()})
        replica_ports = {}  # topology -> the port its ingress replica serves gRPC on itself (Serve's direct ingress)
        if "replica" in a.via:
            for topo in a.topology:
                targets = replica_grpc_targets(app_name_of(topo), port)
                if not targets:
                    raise SystemExit(f"--via replica: no direct-ingress gRPC port for {topo} (is Serve's direct "
                                     "ingress on? RAY_SERVE_ENABLE_DIRECT_INGRESS)")
                replica_ports[topo] = targets[0][1]
            print(f"  replica gRPC ports: {replica_ports}", flush=True)

        async def main():
            engine = AsyncLLMEngine(a.model, max_waiting=256, **engine_args)
            httpx = _httpx()
            limits = httpx.Limits(max_connections=max(a.streams) + 4, max_keepalive_connections=max(a.streams) + 4)
            chans = {t: grpc.aio.insecure_channel(f"127.0.0.1:{p}") for t, p in replica_ports.items()}
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch, httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{http_port}", timeout=600, limits=limits) as hc:
                stub = pbg.MemServeStub(ch)
                paths = [("in-process", inproc_path(engine, a, SamplingParams), self_meter)]
                for topo in a.topology:
                    if "proxy" in a.via:
                        paths.append((f"gRPC+Ray {topo}", grpc_path(stub, pb, a, app_name_of(topo), f"gRPC+Ray {topo}"),
                                      meters[topo]))
                    if topo in chans:
                        label = f"gRPC+Ray {topo} @replica"
                        paths.append((label, grpc_path(pbg.MemServeStub(chans[topo]), pb, a, app_name_of(topo), label),
                                      meters[topo]))
                    if a.api == "http":
                        paths.append((f"HTTP+Ray {topo}", http_path(hc, a, prefixes[topo], f"HTTP+Ray {topo}"),
                                      meters[topo]))
                for _, run, _ in paths:  # warm-up every path
                    await run(2)
                merged: dict[str, list[Wave]] = {m: [] for m, _, _ in paths}
                for n in a.streams:
                    reps: dict[str, list[Wave]] = {m: [] for m, _, _ in paths}
                    for rep in range(a.repeats):
                        order = paths if rep % 2 == 0 else paths[::-1]
                        for mode, run, meter in order:
                            reps[mode].append(await meter.measure(run(n)))
                        print(f"    round {rep + 1}/{a.repeats}: " + ", ".join(
                            f"{m} {ws[-1].summary()['tok_s']:.1f}" for m, ws in reps.items()), flush=True)
                    for mode in merged:
                        merged[mode].append(_merge(reps[mode]))
                    print(f"  {n:>2} streams: " + ", ".join(f"{m} {w[-1].summary()['tok_s']:.1f} tok/s"
                                                         for m, w in merged.items()), flush=True)
            for c in chans.values():
                await c.close()
            engine.shutdown()
            return merged

        return asyncio.run(main())
    finally:
        serve.shutdown()
        ray.shutdown()


def _cpu_cell(s: dict) -> str:
    c = s["cpu_ms_per_token"]
    return " / ".join(f"{k} {v:.1f}" for k, v in c.items())


def paired(r: dict, b: dict) -> dict:
    """Served row r against the in-process row b of the same run: per-round added ITL p50 (ms) and
    tokens/s ratio, medians and quartiles over rounds (module doc). Rows saved before rounds were
    recorded fall back to the pooled statistics (one 'round')."""
    rr, bb = r.get("rounds") or [], b.get("rounds") or []
    if rr and len(rr) == len(bb):
        added = [x["itl_p50_ms"] - y["itl_p50_ms"] for x, y in zip(rr, bb)]
        ratio = [x["tok_s"] / y["tok_s"] for x, y in zip(rr, bb) if y["tok_s"]]
    else:
        added = [r["itl_p50_ms"] - b["itl_p50_ms"]]
        ratio = [r["tok_s"] / b["tok_s"]] if b["tok_s"] else [float("nan")]
    return {"added_itl_ms": pct(added, 50), "added_q": (pct(added, 25), pct(added, 75)),
            "ratio": pct(ratio, 50), "ratio_q": (pct(ratio, 25), pct(ratio, 75)), "rounds": len(added)}


def table(results: dict[str, list[dict]]) -> str:
    """One row per (streams, path) from Wave summaries: tokens/s ratio and added ITL against the
    in-process row of the same run, paired per round (median [quartiles])."""
    rows = ["| streams | path | TTFT p50 / p99 (ms) | ITL p50 / p95 (ms) | tok/s | tok/s ratio | added ITL p50 (ms) "
            "| msgs/token | CPU ms per token |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    base = {s["streams"]: s for s in results["in-process"]}
    for n in sorted(base):
        b = base[n]
        for mode, summaries in results.items():
            r = next((s for s in summaries if s["streams"] == n), None)
            if r is None:
                continue
            if mode == "in-process":
                ratio, added = "1.00", "—"
            else:
                p = paired(r, b)
                ratio, added = f"{p['ratio']:.2f}", f"{p['added_itl_ms']:+.1f}"
                if p["rounds"] > 1:
                    ratio += " [{:.2f}, {:.2f}]".format(*p["ratio_q"])
                    added += " [{:+.1f}, {:+.1f}]".format(*p["added_q"])
            rows.append(f"| {n} | {mode} | {r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f} | {r['itl_p50_ms']:.1f} / "
                        f"{r['itl_p95_ms']:.1f} | {r['tok_s']:.1f} | {ratio} | {added} | {r['msgs_per_token']:.2f} | "
                        f"{_cpu_cell(r)} |")
    return "\n".join(rows)


def verdicts(results: dict[str, list[dict]], n: int = 8) -> list[str]:
    base = {s["streams"]: s for s in results["in-process"]}.get(n)
    out = []
    if base is None:
        return out
    for mode, summaries in results.items():
        r = next((s for s in summaries if s["streams"] == n), None)
        if mode == "in-process" or r is None:
            continue
        p = paired(r, base)
        ratio, added = p["ratio"], p["added_itl_ms"]
        how = f" (median of {p['rounds']} paired rounds)" if p["rounds"] > 1 else ""
        out.append(f"{mode} at {n} streams{how}: throughput {ratio:.2f}x (target >= {TARGET_RATIO}: "
                   f"{'MET' if ratio >= TARGET_RATIO else 'NOT MET'}), added p50 ITL {added:+.1f} ms "
                   f"(target <= {TARGET_ADDED_ITL_MS:g}: {'MET' if added <= TARGET_ADDED_ITL_MS else 'NOT MET'})")
    return out


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, ss in results.items():
        xs = [s["streams"] for s in ss]
        ax1.plot(xs, [s["itl_p50_ms"] for s in ss], "o-", label=mode)
        ax2.plot(xs, [s["tok_s"] for s in ss], "o-", label=mode)
    ax1.set(xlabel="concurrent streams", ylabel="ITL p50 (ms)", title="inter-token latency")
    ax2.set(xlabel="concurrent streams", ylabel="tokens/s (all streams)", title="throughput")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_results(name: str, summaries: dict, head: str, cmd: str, load: list, when: str) -> None:
    """bench/results/NAME.md (+ .json, .png)."""
    RESULTS.mkdir(exist_ok=True)
    text = "\n".join([table(summaries), "", *verdicts(summaries)])
    (RESULTS / f"{name}.md").write_text(
        f"# {name}\n\n`{cmd.strip()}` ({when})\n\n{head}\n\n"
        f"load average before / after: {load[0]:.1f} / {load[1]:.1f}\n\n{text}\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({"results": summaries, "head": head, "cmd": cmd, "when": when,
                                                      "load": load}, indent=2))
    plot(summaries, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.md / .json / .png")



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="memserve bench serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--streams", default="1,4,8,16", help="comma-separated concurrency levels")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--plain-serve", action="store_true", help="Serve's defaults instead of its throughput-optimized mode")
    ap.add_argument("--topology", default="ingress,direct",
                    help="comma-separated: ingress (ingress deployment + engine deployment), direct (engine "
                         "replicas are the gRPC ingress); one Serve app each, same run")
    ap.add_argument("--via", default="proxy",
                    help="comma-separated: proxy (Serve's gRPC proxy, the app's --grpc-port), replica (the gRPC "
                         "port each topology's ingress replica serves itself with Serve's direct ingress: no proxy)")
    ap.add_argument("--api", choices=["grpc", "http"], default="grpc",
                    help="http: also measure the OpenAI-compatible HTTP API (SSE) beside gRPC, in the same run")
    ap.add_argument("--repeats", type=int, default=8,
                    help="rounds per concurrency level (one wave of every path each, order alternating); the "
                         "added ITL and tokens/s ratio are medians of per-round pairs")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--name", default=None, help="write bench/results/NAME.md, .json, .png")
    ap.add_argument("--json", default=None, help="also write the raw summaries here")
    ap.add_argument("--from-json", default=None, help="re-render the table / --name files of a saved --json run")
    a = ap.parse_args(argv)
    a.streams = [int(x) for x in a.streams.split(",") if x]
    a.topology = [t for t in a.topology.split(",") if t]
    a.via = [v for v in a.via.split(",") if v]
    if not a.via or any(v not in ("proxy", "replica") for v in a.via):
        ap.error(f"--via: proxy and/or replica, got {a.via}")
    bad = [t for t in a.topology if t not in ("ingress", "direct")]
    if bad or not a.topology:
        ap.error(f"--topology: ingress and/or direct, got {bad or 'none'}")
    engine_args = {}
    for kv in a.engine_arg:
        k, v = kv.split("=", 1)
        try:
            engine_args[k] = json.loads(v)
        except json.JSONDecodeError:
            engine_args[k] = v
    engine_args.setdefault("max_num_seqs", max(a.streams))

    head = (f"memserve serving benchmark: api={a.api} topology={','.join(a.topology)} via={','.join(a.via)} model={a.model!r} "
            f"streams={a.streams} max_tokens={a.max_tokens} repeats={a.repeats} engine_args={engine_args} "
            f"CPU {cpu_name()} x{os.cpu_count()}")
    cmd = "memserve bench serving " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.from_json:  # re-render a saved run (the --json file of this benchmark)
        saved = json.loads(Path(a.from_json).read_text())
        summaries, load = saved["results"], saved.get("load", [float("nan")] * 2)
        head, cmd, when = saved.get("head", head), saved.get("cmd", cmd), saved.get("when", "saved run")
    else:
        print(head, flush=True)
        load0 = os.getloadavg()
        results = run_all(a, engine_args)
        load = [load0[0], os.getloadavg()[0]]
        summaries = {m: [w.summary() for w in ws] for m, ws in results.items()}
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print()
    print("\n".join([table(summaries), "", *verdicts(summaries)]))
    print(f"\nload average before / after: {load[0]:.1f} / {load[1]:.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"results": summaries, "head": head, "cmd": cmd, "when": when,
                                            "load": load}, indent=2))
    if a.name:
        write_results(a.name, summaries, head, cmd, load, when)
    return 0


if __name__ == "__main__":
    sys.exit(main())
