"""Property-based fuzz of every RPC (memserve.v1.MemServe + grpc.health.v1.Health) over a real gRPC
channel: requests generated from the proto descriptors (proto_fuzz.py), sent by a grpc.aio client
to a real grpc.aio server that serves MemServeIngress's methods the way Serve's proxy does
(grpc_local.py) over the engine worker and the engine test double. Random authorization (valid
keys of two tenants, none, wrong), random client cancels and 1 ms deadlines; every other call has a
short deadline, so a hang shows up as DEADLINE_EXCEEDED (accepted only for Watch, which streams
until the client leaves, and for the deliberate 1 ms deadlines).

Asserts: no INTERNAL / UNKNOWN (nor any code outside ALLOWED), the server still answers a valid
Generate and Health.Check says SERVING, and the KV blocks of the double are back to their starting
count with nothing running or waiting.

Everything runs on one event loop, as in a Serve replica (an asyncio primitive bound to one loop
and used on another raises; see deploy/health.py). Size: MEMSERVE_FUZZ_REQUESTS (default 300 in
CI, under 40 s on 2 shared cores; the issue's 10,000-request run is
`MEMSERVE_FUZZ_REQUESTS=10000 pytest tests/deploy/test_fuzz.py`).
"""

from __future__ import annotations

import asyncio
import collections
import os
import time

import grpc
import proto_fuzz as F
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_local import make_ingress, outcome, start_server
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from memserve.deploy import memserve_pb2 as pb
from memserve.deploy import memserve_pb2_grpc as pbg
from memserve.deploy.auth import ApiKeys, parse_keys
from memserve.deploy.limits import Limits
from memserve.deploy.worker import EngineWorker
from serving_fake_engine import FakeAsyncEngine, FakeSampling
from serving_testlib import LocalClient

BATCH = 25  # calls in flight together; many small hypothesis examples, not one big minimal one
DEFAULT_DEADLINE_S = 5.0
ALWAYS = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED"}


def allowed(name: str, abort) -> set[str]:
    ok = set(ALWAYS)
    if abort is not None and abort[0] == "cancel":
        ok.add("CANCELLED")
    if abort is not None and abort[0] == "deadline":  # the deliberate 1 ms deadlines, and Watch's
        ok.add("DEADLINE_EXCEEDED")
    return ok


async def run_call(ch: grpc.aio.Channel, call, big_deadline_s: float = DEFAULT_DEADLINE_S) -> str:
    """The call's status code name as the client sees it ("CANCELLED" for a client cancel).
    big_deadline_s: the deadline of a request over 16 KiB (a real engine takes seconds on them)."""
    svc, name, req, streaming, auth, abort = call
    kind = ch.unary_stream if streaming else ch.unary_unary
    mc = kind(f"/{svc}/{name}", request_serializer=type(req).SerializeToString,
              response_deserializer=F.response_class(svc, name).FromString)
    timeout = big_deadline_s if req.ByteSize() > 16384 else DEFAULT_DEADLINE_S
    if abort is not None and abort[0] == "deadline":
        timeout = abort[1]
    rpc = mc(req, timeout=timeout, metadata=(("authorization", auth),) if auth is not None else None)
    return await outcome(rpc, streaming, abort[1] if abort is not None and abort[0] == "cancel" else None)


def make_server_parts():
    engine = FakeAsyncEngine(max_waiting=64, max_running=8, step_s=0.0, num_blocks=4096)
    worker = EngineWorker(engine, model_name="fake", replica="r0", sampling_cls=FakeSampling)
    keys = ApiKeys(parse_keys("\n".join(f"{t} {k}" for t, k in F.KEYS.items())))
    ing = make_ingress(LocalClient(worker), unavailable_timeout_s=5.0, sampling_cls=FakeSampling, keys=keys,
                       limits=Limits(max_tokens=64, max_sessions_per_tenant=64, max_request_bytes=1 << 20))
    return engine, ing


async def settle(engine, timeout_s=10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if engine.free_blocks == engine.num_total_blocks and not engine.running and not engine.waiting:
            return True
        await asyncio.sleep(0.01)
    return False


def fuzz(n_requests: int):
    runner = asyncio.Runner()
    engine, ing = make_server_parts()
    baseline = engine.free_blocks

    async def up():
        server, addr = await start_server(ing)  # gRPC's default 4 MiB receive limit; the ingress checks 1 MiB
        return server, grpc.aio.insecure_channel(addr)

    server, ch = runner.run(up())
    counts: collections.Counter = collections.Counter()
    by_method: collections.Counter = collections.Counter()
    bad: list = []

    # no shrinking: the server is stateful and concurrent, a shrunk batch need not fail again; the
    # failing calls are printed as found instead
    @settings(max_examples=max(1, n_requests // BATCH), deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(st.lists(F.calls(), min_size=BATCH, max_size=BATCH))
    def batch(calls):
        async def go():
            codes = await asyncio.gather(*(run_call(ch, c) for c in calls))
            return codes, await settle(engine)

        codes, ok = runner.run(go())
        for c, code in zip(calls, codes):
            name = code.split(" ")[0]
            counts[name] += 1
            by_method[c[1]] += 1
            if name not in allowed(c[1], c[5]):
                bad.append((c[1], str(c[2])[:300], c[4], c[5], code[:300]))
                print(f"\nBAD after {sum(counts.values())} calls: {bad[-1]}", flush=True)
        assert ok, f"KV blocks not back: {engine.free_blocks}/{engine.num_total_blocks}, running {engine.running}"
        assert not bad, bad[:3]

    t0 = time.time()
    try:
        batch()
        elapsed = time.time() - t0

        async def still_serving():
            md = (("authorization", f"Bearer {F.KEYS['alpha']}"),)
            msgs = [m async for m in pbg.MemServeStub(ch).Generate(
                pb.GenerateRequest(prompt="ok", sampling=pb.SamplingParams(max_tokens=3)), metadata=md, timeout=5)]
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return msgs, health.status

        msgs, health = runner.run(still_serving())
    finally:
        runner.run(ch.close())
        runner.run(server.stop(0))
        runner.close()
    assert msgs[-1].finish_reason == "length" and health == health_pb2.HealthCheckResponse.SERVING
    assert engine.free_blocks == baseline and not engine.running and not engine.waiting
    total = sum(counts.values())
    print(f"\nfuzz: {total} requests in {elapsed:.1f} s; codes {dict(counts.most_common())}; "
          f"methods {dict(by_method.most_common())}")
    assert total >= n_requests
    assert counts["CANCELLED"] + counts["DEADLINE_EXCEEDED"] > 0 and counts["OK"] > 0
    return counts


def test_fuzz_every_rpc_no_internal_blocks_back():
    fuzz(int(os.environ.get("MEMSERVE_FUZZ_REQUESTS", "300")))
