"""grpc.health.v1 answers of deploy/health.py (no Ray): over the engine worker + test double
(SERVING, NOT_SERVING when draining / the engine's stats() raises / the probe fails, NOT_FOUND for
an unknown service, Watch sends the current status then each change), loop safety, and over a real
gRPC channel with a real AsyncLLMEngine whose forward fails (the typed protocol's health signal) or
that was shut down (drained: NOT_SERVING, a Generate UNAVAILABLE at once)."""

import asyncio
import contextvars
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_local import make_ingress, start_server
from memserve.deploy import memserve_pb2 as pb
from memserve.deploy import memserve_pb2_grpc as pbg
from memserve.deploy.health import NOT_SERVING, SERVING, Health
from memserve.deploy.ingress import RpcError
from memserve.deploy.worker import EngineWorker
from memserve.runtime.async_engine import UNHEALTHY_AFTER, AsyncLLMEngine
from serving_fake_engine import FakeAsyncEngine, FakeSampling
from serving_testlib import LocalClient
from tiny_models import fail_next_forwards


def make():
    worker = EngineWorker(FakeAsyncEngine(), model_name="fake", replica="r0", sampling_cls=FakeSampling)
    state = {"healthy": True}

    async def probe():
        if not state["healthy"]:  # what ServingEngine.stats() does for an unhealthy engine
            raise RuntimeError("the last 3 engine steps failed (model forward); replace this replica")
        if state.get("raise"):
            raise RuntimeError("engine loop died")
        return worker.model_info()
    return Health(probe, None, cache_s=0.0, watch_period_s=0.01), state


def check(h, service=""):
    return asyncio.run(h.check(health_pb2.HealthCheckRequest(service=service))).status


def test_check_serving_and_not_serving():
    h, state = make()
    assert check(h) == SERVING and check(h, "memserve.v1.MemServe") == SERVING
    state["healthy"] = False
    assert check(h) == NOT_SERVING
    state["healthy"], state["raise"] = True, True
    assert check(h) == NOT_SERVING
    state["raise"] = False
    h.draining = True
    assert check(h) == NOT_SERVING
    with pytest.raises(RpcError) as ei:
        check(h, "no.such.Service")
    assert ei.value.code == "NOT_FOUND"


def test_watch_sends_current_then_changes():
    h, state = make()

    async def go():
        agen = h.watch(health_pb2.HealthCheckRequest(service=""))
        first = (await asyncio.wait_for(agen.__anext__(), 2)).status
        h.draining = True
        second = (await asyncio.wait_for(agen.__anext__(), 2)).status
        await agen.aclose()
        return first, second
    assert asyncio.run(go()) == (SERVING, NOT_SERVING)


def test_servicer_answers_from_two_event_loops():
    """Concurrent probes on one loop, then on another: nothing in Health binds to the first loop
    (an asyncio.Lock did, and the second loop's calls raised RuntimeError -> INTERNAL)."""
    calls = []

    async def slow_probe():
        calls.append(1)
        await asyncio.sleep(0.02)  # long enough that the concurrent checks below overlap
        return {"healthy": True}

    h = Health(slow_probe, None, cache_s=0.0)

    async def burst():
        reqs = [h.check(health_pb2.HealthCheckRequest(service="")) for _ in range(5)]
        return [r.status for r in await asyncio.gather(*reqs)]

    for _ in range(2):  # two asyncio.run = two event loops
        assert asyncio.run(burst()) == [SERVING] * 5
    assert len(calls) == 2  # one shared probe per burst, not one per call


def test_caller_leaving_does_not_cancel_the_shared_probe():
    started, release = [], None

    async def probe():
        started.append(1)
        await release.wait()
        return {"healthy": True}

    h = Health(probe, None, cache_s=0.0)

    async def go():
        nonlocal release
        release = asyncio.Event()
        leaver = asyncio.ensure_future(h.status())
        stayer = asyncio.ensure_future(h.status())
        await asyncio.sleep(0.01)
        leaver.cancel()  # e.g. a Watch whose deadline passed
        await asyncio.sleep(0.01)
        release.set()
        return await asyncio.wait_for(stayer, 2)
    assert asyncio.run(go()) == (SERVING, "ok") and len(started) == 1


def test_shared_probe_runs_outside_the_first_callers_context():
    """In a Serve replica the caller's contextvars hold its request, and Serve cancels the handle
    calls made in it when that request is cancelled: the shared probe must not run in the context
    of whichever caller started it (3 INTERNAL of 10,000 fuzz calls through real Serve before)."""
    request = contextvars.ContextVar("request", default=None)
    seen = []

    async def probe():
        seen.append(request.get())
        return {"healthy": True}

    h = Health(probe, None, cache_s=0.0)

    async def caller():
        request.set("watch-1")
        return await h.status()

    assert asyncio.run(caller()) == (SERVING, "ok") and seen == [None]


def test_real_engine_failing_forward_flips_health_over_grpc(tiny_llama_dir):
    """Check and Watch over a real channel follow AsyncLLMEngine's health (stats() raises after
    UNHEALTHY_AFTER failing steps in a row; one good step makes it healthy again)."""
    eng = AsyncLLMEngine(str(tiny_llama_dir), progress=False, num_kv_blocks=64)
    fail = fail_next_forwards(eng.engine, lambda: RuntimeError("injected forward failure"))
    ing = make_ingress(LocalClient(EngineWorker(eng, model_name="tiny", replica="r0")), unavailable_timeout_s=10.0)
    req = pb.GenerateRequest(prompt_token_ids=[1, 2, 3], sampling=pb.SamplingParams(max_tokens=2, temperature=0.0))

    async def go():
        server, addr = await start_server(ing)
        seen = []
        try:
            async with grpc.aio.insecure_channel(addr) as ch:
                stub, health = pbg.MemServeStub(ch), health_pb2_grpc.HealthStub(ch)

                async def check():
                    return (await health.Check(health_pb2.HealthCheckRequest(), timeout=10)).status

                watch = health.Watch(health_pb2.HealthCheckRequest(service="memserve.v1.MemServe"), timeout=60)
                seen.append(("check", await check()))
                seen.append(("watch", (await watch.read()).status))
                fail["n"] = UNHEALTHY_AFTER
                for _ in range(UNHEALTHY_AFTER):
                    with pytest.raises(grpc.aio.AioRpcError) as ei:
                        _ = [m async for m in stub.Generate(req, timeout=10)]
                    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value
                seen.append(("check", await check()))
                seen.append(("watch", (await watch.read()).status))
                assert fail["n"] == 0  # each Generate failed at its first step
                msgs = [m async for m in stub.Generate(req, timeout=10)]  # a good step: healthy again
                assert msgs[-1].finish_reason == "length"
                seen.append(("check", await check()))
                seen.append(("watch", (await watch.read()).status))
                watch.cancel()
        finally:
            await server.stop(0)
        return seen

    try:
        seen = asyncio.run(go())
    finally:
        eng.shutdown()
    assert seen == [("check", SERVING), ("watch", SERVING), ("check", NOT_SERVING), ("watch", NOT_SERVING),
                    ("check", SERVING), ("watch", SERVING)]


def test_real_engine_after_shutdown_is_not_serving_and_refuses_fast_over_grpc(tiny_llama_dir):
    """A drained AsyncLLMEngine (shutdown) reads NOT_SERVING over a real channel, and a Generate sent
    to it is UNAVAILABLE at once naming the drain (it used to read SERVING and hang until the
    ingress timed out)."""
    eng = AsyncLLMEngine(str(tiny_llama_dir), progress=False, num_kv_blocks=64)
    ing = make_ingress(LocalClient(EngineWorker(eng, model_name="tiny", replica="r0")), unavailable_timeout_s=10.0)
    req = pb.GenerateRequest(prompt_token_ids=[1, 2, 3], sampling=pb.SamplingParams(max_tokens=2, temperature=0.0))

    async def go():
        server, addr = await start_server(ing)
        try:
            async with grpc.aio.insecure_channel(addr) as ch:
                stub, health = pbg.MemServeStub(ch), health_pb2_grpc.HealthStub(ch)
                before = (await health.Check(health_pb2.HealthCheckRequest(), timeout=10)).status
                await asyncio.to_thread(eng.shutdown)
                after = (await health.Check(health_pb2.HealthCheckRequest(), timeout=10)).status
                t0 = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    _ = [m async for m in stub.Generate(req, timeout=10)]
                return before, after, ei.value, time.monotonic() - t0
        finally:
            await server.stop(0)

    try:
        before, after, err, secs = asyncio.run(go())
    finally:
        eng.shutdown()
    assert (before, after) == (SERVING, NOT_SERVING)
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.details(), err
    assert secs < 5.0, f"a Generate to a drained engine took {secs:.1f} s (should fail at once)"
