"""Issue 17 item 4 at the gRPC edge without Ray: a memory shard that stays unavailable fails the
request with UNAVAILABLE naming the shard (never INTERNAL, never a silent zero row), through the real
AsyncLLMEngine + EngineWorker + IngressCore, and the engine keeps serving once the shard is back."""

import asyncio

import pytest
from memserve.deploy import memserve_pb2 as pb
from memserve.deploy.ingress import IngressCore, RpcError
from memserve.deploy.remote_value_store import MemoryShardUnavailableError
from memserve.deploy.worker import EngineWorker, error_of
from memserve.runtime.async_engine import AsyncLLMEngine
from memserve.runtime.errors import DependencyUnavailableError, EngineStepError
from memserve.runtime.memory_layers import ValueStore
from serving_testlib import LocalClient
from tiny_models import make_tiny_memory_model

SHARD = "tbl/shard1"


class FlakyStore(ValueStore):
    """Wraps the real table; while `down`, every read raises like RemoteValueStore after its bound."""

    def __init__(self, inner):
        self.inner, self.down = inner, True
        self.num_rows, self.dim = inner.num_rows, inner.dim

    def submit(self, indices, weights):
        if self.down:
            raise MemoryShardUnavailableError(SHARD, 0.5, ConnectionError("replica died"))
        return self.inner.submit(indices, weights)

    @property
    def nbytes(self):
        return self.inner.nbytes

    @property
    def dtype(self):
        return self.inner.dtype


def test_deploy_error_is_a_runtime_dependency_error():
    e = MemoryShardUnavailableError(SHARD, 1.0, None)
    assert isinstance(e, DependencyUnavailableError) and isinstance(e, RuntimeError)
    assert e.dependency == SHARD
    wrapped = EngineStepError("engine step failed")
    wrapped.__cause__ = e
    for exc in (e, wrapped):  # raw (outside the engine thread) or as the engine wraps it
        mapped = error_of(exc)["error"]
        assert mapped["code"] == "UNAVAILABLE" and mapped["message"].startswith(f"memory shard {SHARD} unavailable")


def test_unavailable_shard_fails_request_with_unavailable_naming_shard(tmp_path):
    d = make_tiny_memory_model(tmp_path / "m", mode="parallel", seed=3)
    eng = AsyncLLMEngine(str(d), progress=False, num_kv_blocks=64)
    try:
        model = eng.engine.model
        (name, real), = model.value_stores().items()
        store = FlakyStore(real)
        model.replace_value_store(name, store)
        core = IngressCore(LocalClient(EngineWorker(eng, model_name="m", replica="r0")), unavailable_timeout_s=5.0)
        req = pb.GenerateRequest(prompt_token_ids=[5, 6, 7, 8],
                                 sampling=pb.SamplingParams(max_tokens=4, temperature=0.0))

        async def collect():
            return [m async for m in core.generate(req)]

        with pytest.raises(RpcError) as ei:
            asyncio.run(collect())
        assert ei.value.code == "UNAVAILABLE", ei.value.details
        assert ei.value.details.startswith(f"memory shard {SHARD} unavailable"), ei.value.details
        # the shard comes back: the same engine serves the request (its blocks were freed)
        store.down = False
        msgs = asyncio.run(collect())
        assert sum(len(m.token_ids) for m in msgs) == 4 and msgs[-1].finish_reason == "length"
    finally:
        eng.shutdown()
