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
