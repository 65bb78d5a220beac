"""grpc.health.v1 answers of deploy/health.py over the engine worker + test double (no Ray):
SERVING, NOT_SERVING when draining / the engine reports unhealthy / the probe fails, NOT_FOUND for
an unknown service, Watch sends the current status then each change."""

import asyncio

import pytest
from grpc_health.v1 import health_pb2
from memserve.deploy.health import NOT_SERVING, SERVING, Health
from memserve.deploy.ingress import RpcError
from memserve.deploy.worker import EngineWorker
from serving_fake_engine import FakeAsyncEngine, FakeSampling


def make():
    worker = EngineWorker(FakeAsyncEngine(), model_name="fake", replica="r0", sampling_cls=FakeSampling)
    state = {"healthy": True}

    async def probe():
        info = worker.model_info()
        if state.get("raise"):
            raise RuntimeError("engine loop died")
        info["healthy"] = state["healthy"]
        return info
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
