"""1,000 random client cancels and 1 ms deadlines over a real gRPC channel (issue 20 'show'): a
grpc.aio client against MemServeIngress's methods on a real grpc.aio server (grpc_local.py), the
EngineWorker and a real AsyncLLMEngine with a tiny random-weight model, no Ray.

Each call is a Generate (random prompt ids, max_tokens 1..24, greedy) or an Ingest into one of a few
sessions, that the client cancels after 0..30 ms, gives a 1 ms deadline, or lets finish. Afterwards:
the engine's free KV blocks are back to the baseline with nothing running or waiting, once the
sessions are deleted; every call ended OK / CANCELLED / DEADLINE_EXCEEDED (an Ingest also
INVALID_ARGUMENT "already has a running request" when the previous ingest of its session still
runs: aborts are asynchronous), nothing else; the server
still serves: the same greedy tokens as before the storm, Health.Check SERVING.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_local import make_ingress, outcome, start_server
from memserve.deploy import memserve_pb2 as pb
from memserve.deploy import memserve_pb2_grpc as pbg
from memserve.deploy.worker import EngineWorker
from memserve.runtime.async_engine import AsyncLLMEngine
from serving_testlib import LocalClient

N_CALLS = 1000
WAVE = 50  # calls in flight together
SESSIONS = ["c0", "c1", "c2"]
LONG = 1500  # tokens of a Generate the client cancels or lets time out (tiny model: 2048 context)
SETTLE_S = 5.0
BUSY = "already has a running request"
PROBE = pb.GenerateRequest(prompt_token_ids=[3, 1, 4, 1, 5, 9, 2, 6],
                           sampling=pb.SamplingParams(max_tokens=8, temperature=0.0))


async def one_call(stub: pbg.MemServeStub, rng: random.Random, vocab: int) -> str:
    how = rng.choice(["cancel", "cancel", "deadline", "finish"])
    if rng.random() < 0.8:
        # what the client leaves is long (LONG tokens, no EOS): unless it is aborted, the engine
        # would still be busy with it minutes later and the blocks would not be back in SETTLE_S
        n = rng.randint(1, 24) if how == "finish" else LONG
        req = pb.GenerateRequest(prompt_token_ids=[rng.randrange(vocab) for _ in range(rng.randint(1, 40))],
                                 sampling=pb.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=how != "finish"))
        method = stub.Generate
    else:
        req = pb.IngestRequest(session_id=rng.choice(SESSIONS),
                               token_ids=[rng.randrange(vocab) for _ in range(rng.randint(1, 48))])
        method = stub.Ingest
    kind = type(req).__name__
    rpc = method(req, timeout=0.001 if how == "deadline" else 30.0)
    code = await outcome(rpc, True, rng.uniform(0, 0.03) if how == "cancel" else None)
    if kind == "IngestRequest" and code.startswith("INVALID_ARGUMENT") and BUSY in code:
        return "BUSY"  # another ingest of this session still runs (an abort is asynchronous)
    return code


def test_random_cancels_and_deadlines_free_every_block(tiny_llama_dir):
    eng = AsyncLLMEngine(str(tiny_llama_dir), progress=False, num_kv_blocks=256)
    worker = EngineWorker(eng, model_name="tiny", replica="r0")
    ing = make_ingress(LocalClient(worker), unavailable_timeout_s=10.0)
    vocab = int(eng.model_info()["vocab_size"])
    rng = random.Random(20)

    async def go():
        server, addr = await start_server(ing)
        try:
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = pbg.MemServeStub(ch)
                before = [m async for m in stub.Generate(PROBE, timeout=30)]
                baseline = eng.stats().num_free_blocks
                codes: collections.Counter = collections.Counter()
                t0 = time.monotonic()
                for _ in range(N_CALLS // WAVE):
                    for code in await asyncio.gather(*(one_call(stub, rng, vocab) for _ in range(WAVE))):
                        codes[code if code.startswith(("INVALID", "INTERNAL", "UNKNOWN")) else code.split(" ")[0]] += 1
                storm_s = time.monotonic() - t0
                for sid in SESSIONS:  # sessions hold blocks by design; deleting them returns those
                    try:
                        await stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=10)
                    except grpc.aio.AioRpcError as e:  # an ingest that never got far enough to open it
                        assert e.code() == grpc.StatusCode.NOT_FOUND, e
                deadline = time.monotonic() + SETTLE_S
                while time.monotonic() < deadline:
                    st = eng.stats()
                    if st.num_free_blocks == baseline and not st.num_running and not st.num_waiting:
                        break
                    await asyncio.sleep(0.05)
                after = [m async for m in stub.Generate(PROBE, timeout=30)]
                health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
                return before, after, baseline, eng.stats(), codes, storm_s, health.status
        finally:
            await server.stop(0)

    try:
        before, after, baseline, st, codes, storm_s, health = asyncio.run(go())
    finally:
        eng.shutdown()
    print(f"\n{N_CALLS} calls in {storm_s:.1f} s: {dict(codes.most_common())}")
    assert set(codes) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "BUSY"}, codes
    assert codes["CANCELLED"] > 100 and codes["DEADLINE_EXCEEDED"] > 100 and codes["OK"] > 100, codes
    assert (st.num_free_blocks, st.num_running, st.num_waiting) == (baseline, 0, 0), (st, baseline)
    # same tokens (messages may coalesce differently: the worker batches what is queued)
    assert [t for m in after for t in m.token_ids] == [t for m in before for t in m.token_ids]
    assert after[-1].finish_reason == "length"
    assert health == health_pb2.HealthCheckResponse.SERVING
