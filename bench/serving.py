"""Serving overhead: the in-process async engine vs the same engine behind gRPC + Ray Serve (and,
with `--api http`, behind the OpenAI-compatible HTTP API on Serve's HTTP proxy too).

    memserve bench serving                         # default model, 1/4/8/16 streams
    memserve bench serving --model /path/to/hf --streams 1,8 --max-tokens 32
    memserve bench serving --api http --streams 1,8   # in-process vs gRPC vs HTTP (SSE), same run

For each concurrency N, N streams start together (distinct prompts, greedy, ignore_eos so every
stream generates exactly --max-tokens tokens). Measured on the client side:
TTFT (send -> first token), ITL (gap between token arrivals; a message carrying k tokens counts as
k gaps of gap/k), throughput (generated tokens / wall time of the waves). Both paths are up at once
(the in-process AsyncLLMEngine in this process; one Serve engine replica with the same engine
arguments) and their waves alternate, so load drift on a shared machine hits both alike.

HTTP (`--api http`): streamed POST /v1/completions (httpx, one connection per stream), tokens
counted per server-sent event with the `return_token_ids` extension; its waves alternate with the
other two, and the table adds its ratio to gRPC.

Targets (issue 4): gRPC+Ray throughput >= 0.9x in-process at 8 streams; added p50 ITL <= 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field

PROMPT_WORDS = ("memory river lantern orbit quiet copper meadow signal harbor violet engine summer paper "
                "glacier whisper canyon").split()


def make_prompt(i: int, words: int) -> str:
    return "Story %d: " % i + " ".join(PROMPT_WORDS[(i * 7 + k) % len(PROMPT_WORDS)] for k in range(words))


@dataclass
class Wave:
    mode: str
    streams: int
    ttft: list = field(default_factory=list)
    itl: list = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0

    def pct(self, xs, p):
        if not xs:
            return float("nan")
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

    def summary(self) -> dict:
        return {"mode": self.mode, "streams": self.streams,
                "ttft_p50_ms": 1e3 * self.pct(self.ttft, 50), "ttft_p99_ms": 1e3 * self.pct(self.ttft, 99),
                "itl_p50_ms": 1e3 * self.pct(self.itl, 50), "itl_p99_ms": 1e3 * self.pct(self.itl, 99),
                "tok_s": self.tokens / self.wall_s if self.wall_s else 0.0, "tokens": self.tokens}


class Stream:
    def __init__(self, wave: Wave):
        self.wave, self.t0, self.last = wave, time.perf_counter(), None

    def on(self, n_tokens: int):
        if n_tokens <= 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self.wave.ttft.append(now - self.t0)
            if n_tokens > 1:
                self.wave.itl.extend([0.0] * (n_tokens - 1))
        else:
            self.wave.itl.extend([(now - self.last) / n_tokens] * n_tokens)
        self.last = now
        self.wave.tokens += n_tokens


# ---- in-process ---------------------------------------------------------------------------------

async def inproc_wave(engine, n: int, a, SamplingParams) -> Wave:
    wave = Wave("in-process", n)

    async def one(i):
        st = Stream(wave)
        params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
        async for out in engine.generate(make_prompt(i, a.prompt_words), params, uuid.uuid4().hex):
            st.on(len(out.new_token_ids))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wave.wall_s = time.perf_counter() - t0
    return wave


# ---- gRPC + Ray ---------------------------------------------------------------------------------

async def grpc_wave(stub, pb, n: int, a) -> Wave:
    wave = Wave("gRPC+Ray", n)

    async def one(i):
        st = Stream(wave)
        req = pb.GenerateRequest(prompt=make_prompt(i, a.prompt_words),
                                 sampling=pb.SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True))
        async for msg in stub.Generate(req, timeout=600):
            st.on(len(msg.token_ids))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wave.wall_s = time.perf_counter() - t0
    return wave


# ---- HTTP (OpenAI-compatible) + Ray ------------------------------------------------------------

def _httpx():
    try:  # the openai package's own HTTP client (httpx2 for openai>=3)
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx


async def http_wave(client, n: int, a) -> Wave:
    wave = Wave("HTTP+Ray", n)

    async def one(i):
        st = Stream(wave)
        body = {"model": a.model, "prompt": make_prompt(i, a.prompt_words), "max_tokens": a.max_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": True, "return_token_ids": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    st.on(len(json.loads(line[6:])["choices"][0].get("token_ids") or ()))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wave.wall_s = time.perf_counter() - t0
    return wave


def _merge(waves: list[Wave]) -> Wave:
    """Repetitions of one (mode, streams): latencies pooled, throughput = total tokens / total time."""
    out = Wave(waves[0].mode, waves[0].streams)
    for w in waves:
        out.ttft += w.ttft
        out.itl += w.itl
        out.tokens += w.tokens
        out.wall_s += w.wall_s
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_both(a, engine_args) -> tuple[list[Wave], list[Wave], list[Wave]]:
    """All paths live at once and their waves alternate (in-process, gRPC[, HTTP], then the reverse
    order, ...), so load drift on a shared machine hits every side alike."""
    import grpc
    import ray
    from memserve.deploy import memserve_pb2 as pb
    from memserve.deploy import memserve_pb2_grpc as pbg
    from memserve.deploy.app import init_ray, start
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
        cfg = AppConfig(model=a.model, engine_args=engine_args, max_waiting=256, num_replicas=1, topology=a.topology)
        start(cfg, grpc_port=port, http_port=http_port)

        async def main():
            engine = AsyncLLMEngine(a.model, max_waiting=256, **engine_args)
            httpx = _httpx()
            limits = httpx.Limits(max_connections=max(a.streams) + 4, max_keepalive_connections=max(a.streams) + 4)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch, httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{http_port}", timeout=600, limits=limits) as hc:
                stub = pbg.MemServeStub(ch)
                paths = [lambda n: inproc_wave(engine, n, a, SamplingParams), lambda n: grpc_wave(stub, pb, n, a)]
                if a.api == "http":
                    paths.append(lambda n: http_wave(hc, n, a))
                for run in paths:  # warm-up every path
                    await run(2)
                merged: list[list[Wave]] = [[] for _ in paths]
                for n in a.streams:
                    reps: list[list[Wave]] = [[] for _ in paths]
                    for rep in range(a.repeats):
                        order = range(len(paths)) if rep % 2 == 0 else reversed(range(len(paths)))
                        for k in order:
                            reps[k].append(await paths[k](n))
                    for k in range(len(paths)):
                        merged[k].append(_merge(reps[k]))
                    print(f"  {n:>2} streams: " + ", ".join(f"{m[-1].mode} {m[-1].summary()['tok_s']:.1f} tok/s"
                                                         for m in merged), flush=True)
            engine.shutdown()
            return merged[0], merged[1], (merged[2] if a.api == "http" else [])

        return asyncio.run(main())
    finally:
        serve.shutdown()
        ray.shutdown()

def table(inproc: list[Wave], viaray: list[Wave], viahttp: list[Wave] = ()) -> str:
    """Ratios and added p50 ITL against in-process; HTTP rows also against gRPC (same run)."""
    rows = ["| streams | path | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | tok/s | throughput ratio | added ITL p50 (ms) "
            "| vs gRPC: tok/s ratio, added ITL p50 (ms) |",
            "|---:|---|---:|---:|---:|---:|---:|---:|"]
    by_n = {w.streams: w.summary() for w in inproc}
    grpc_n = {w.streams: w.summary() for w in viaray}
    http_n = {w.streams: w.summary() for w in viahttp}

    def row(r, label, base, ref=None):
        ratio = r["tok_s"] / base["tok_s"] if base else float("nan")
        added = r["itl_p50_ms"] - base["itl_p50_ms"] if base else float("nan")
        vs = f"{r['tok_s'] / ref['tok_s']:.2f}, {r['itl_p50_ms'] - ref['itl_p50_ms']:+.1f}" if ref else "—"
        return (f"| {r['streams']} | {label} | {r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f} | "
                f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['tok_s']:.1f} | {ratio:.2f} | {added:+.1f} | {vs} |")

    for n, g in grpc_n.items():
        b = by_n.get(n)
        if b is not None:
            rows.append(f"| {n} | in-process | {b['ttft_p50_ms']:.1f} / {b['ttft_p99_ms']:.1f} | "
                        f"{b['itl_p50_ms']:.1f} / {b['itl_p99_ms']:.1f} | {b['tok_s']:.1f} | 1.00 | — | — |")
        rows.append(row(g, "gRPC + Ray", b))
        if n in http_n:
            rows.append(row(http_n[n], "HTTP (OpenAI SSE) + Ray", b, g))
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="memserve bench serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--streams", default="1,4,8,16", help="comma-separated concurrency levels")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--plain-serve", action="store_true", help="Serve's defaults instead of its throughput-optimized mode")
    ap.add_argument("--topology", choices=["ingress", "direct"], default="ingress",
                    help="ingress deployment + engine deployment (default), or engine replicas as the gRPC ingress")
    ap.add_argument("--api", choices=["grpc", "http"], default="grpc",
                    help="http: also measure the OpenAI-compatible HTTP API (SSE) beside gRPC, in the same run")
    ap.add_argument("--repeats", type=int, default=2, help="alternating repetitions per concurrency level")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", default=None, help="also write the raw summaries here")
    a = ap.parse_args(argv)
    a.streams = [int(x) for x in a.streams.split(",") if x]
    engine_args = {}
    for kv in a.engine_arg:
        k, v = kv.split("=", 1)
        try:
            engine_args[k] = json.loads(v)
        except json.JSONDecodeError:
            engine_args[k] = v
    engine_args.setdefault("max_num_seqs", max(a.streams))

    print(f"memserve serving benchmark: api={a.api} topology={a.topology} model={a.model!r} streams={a.streams} max_tokens={a.max_tokens} "
          f"engine_args={engine_args} cpus={os.cpu_count()}", flush=True)
    inproc, viaray, viahttp = run_both(a, engine_args)
    print()
    print(table(inproc, viaray, viahttp))
    b8 = {w.streams: w.summary() for w in inproc}.get(8)
    r8 = {w.streams: w.summary() for w in viaray}.get(8)
    if b8 and r8:
        ratio, added = r8["tok_s"] / b8["tok_s"], r8["itl_p50_ms"] - b8["itl_p50_ms"]
        print(f"\ntarget throughput >= 0.9x at 8 streams: {ratio:.2f}x -> {'MET' if ratio >= 0.9 else 'NOT MET'}")
        print(f"target added p50 ITL <= 5 ms at 8 streams: {added:+.1f} ms -> {'MET' if added <= 5 else 'NOT MET'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"inproc": [w.summary() for w in inproc], "ray": [w.summary() for w in viaray],
                       "http": [w.summary() for w in viahttp],
                       "args": {k: v for k, v in vars(a).items()}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
