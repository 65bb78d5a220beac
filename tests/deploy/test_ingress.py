"""Ingress + engine worker without Ray, against the engine test double: validation and status
codes, streaming, coalescing, cancellation, sessions. (The real thing runs in test_e2e.py.)"""

import asyncio

import pytest
from memserve.deploy import memserve_pb2 as pb
from memserve.deploy.app import _LocalStream  # pulls lazily, like a slow transport
from memserve.deploy.ingress import IngressCore, RpcError, validate_generate
from memserve.deploy.worker import EngineWorker
from serving_fake_engine import FakeAsyncEngine, FakeSampling
from serving_testlib import LocalClient


def make(**engine_kw):
    engine = FakeAsyncEngine(**engine_kw)
    worker = EngineWorker(engine, model_name="fake", replica="r0", sampling_cls=FakeSampling)
    return engine, IngressCore(LocalClient(worker), unavailable_timeout_s=2.0, sampling_cls=FakeSampling)


async def collect(agen):
    return [m async for m in agen]


def expected_tokens(ids, n, vocab=100):
    return [(sum(ids) + 7 * i) % vocab for i in range(n)]


def test_generate_streams_all_tokens_and_usage():
    engine, core = make()
    req = pb.GenerateRequest(prompt_token_ids=[1, 2, 3], sampling=pb.SamplingParams(max_tokens=9))
    msgs = asyncio.run(collect(core.generate(req)))
    ids = [t for m in msgs for t in m.token_ids]
    assert ids == expected_tokens([1, 2, 3], 9)
    assert "".join(m.text for m in msgs) == "".join(f"<{t}>" for t in ids)
    assert [m.finish_reason for m in msgs[:-1]] == [""] * (len(msgs) - 1)
    assert msgs[-1].finish_reason == "length"
    assert (msgs[-1].usage.prompt_tokens, msgs[-1].usage.completion_tokens) == (3, 9)
    assert engine.free_blocks == engine.num_total_blocks


def test_slow_consumer_gets_coalesced_chunks_without_loss():
    engine, core = make(step_s=0.0005)

    async def slow():
        out = []
        async for m in core.generate(pb.GenerateRequest(prompt="ab", sampling=pb.SamplingParams(max_tokens=40))):
            out.append(m)
            await asyncio.sleep(0.01)
        return out

    msgs = asyncio.run(slow())
    ids = [t for m in msgs for t in m.token_ids]
    assert ids == expected_tokens([ord("a") % 100, ord("b") % 100], 40)
    assert len(msgs) < 40  # several tokens per message when the consumer lags


@pytest.mark.parametrize("req, field", [
    (pb.GenerateRequest(), "prompt"),
    (pb.GenerateRequest(prompt="x", prompt_token_ids=[1]), "prompt"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="robot", content="x")]), "messages[0].role"),
    (pb.GenerateRequest(prompt_token_ids=[1, 100]), "prompt_token_ids[1]"),
    (pb.GenerateRequest(prompt_token_ids=[-1]), "prompt_token_ids[0]"),
    (pb.GenerateRequest(prompt="x", request_id="r" * 200), "request_id"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(max_tokens=0)), "sampling.max_tokens"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(temperature=-1)), "sampling.temperature"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_p=1.5)), "sampling.top_p"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_k=-2)), "sampling.top_k"),
])
def test_bad_fields_are_invalid_argument_naming_the_field(req, field):
    engine, core = make()
    with pytest.raises(RpcError) as ei:
        asyncio.run(collect(core.generate(req)))
    assert ei.value.code == "INVALID_ARGUMENT"
    assert ei.value.details.startswith(field + ":"), ei.value.details
    # and it keeps serving
    ok = asyncio.run(collect(core.generate(pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(max_tokens=2)))))
    assert ok[-1].finish_reason == "length"


def test_validate_keeps_only_set_sampling_fields():
    req = validate_generate(pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(temperature=0.0, seed=3)),
                            vocab_size=None)
    assert req["sampling"] == {"temperature": 0.0, "seed": 3}
    assert req["request_id"] and req["session_id"] is None


def test_queue_full_is_resource_exhausted():
    engine, core = make(max_waiting=0)
    with pytest.raises(RpcError) as ei:
        asyncio.run(collect(core.generate(pb.GenerateRequest(prompt="x"))))
    assert ei.value.code == "RESOURCE_EXHAUSTED"


def test_unknown_session_not_found_then_ingest_get_delete():
    engine, core = make()

    async def scenario():
        with pytest.raises(RpcError) as ei:
            await collect(core.generate(pb.GenerateRequest(prompt="x", session_id="nope")))
        assert ei.value.code == "NOT_FOUND" and "nope" in ei.value.details
        with pytest.raises(RpcError) as ei:
            await core.get_session(pb.GetSessionRequest(session_id="doc"))
        assert ei.value.code == "NOT_FOUND"
        prog = await collect(core.ingest(pb.IngestRequest(session_id="doc", text="a" * 40)))
        assert prog[-1].done and prog[-1].tokens_done == prog[-1].tokens_total == 40
        info = await core.get_session(pb.GetSessionRequest(session_id="doc"))
        assert info.num_tokens == 40 and info.replica == "r0"
        msgs = await collect(core.generate(pb.GenerateRequest(prompt="q", session_id="doc",
                                                              sampling=pb.SamplingParams(max_tokens=3))))
        assert msgs[-1].finish_reason == "length"
        assert (await core.delete_session(pb.DeleteSessionRequest(session_id="doc"))).deleted
        with pytest.raises(RpcError) as ei:
            await core.delete_session(pb.DeleteSessionRequest(session_id="doc"))
        assert ei.value.code == "NOT_FOUND"

    asyncio.run(scenario())


def test_engine_without_sessions_is_unimplemented():
    engine, core = make(sessions=False)

    async def scenario():
        for coro in (core.get_session(pb.GetSessionRequest(session_id="s")),
                     core.delete_session(pb.DeleteSessionRequest(session_id="s")),
                     collect(core.ingest(pb.IngestRequest(session_id="s", text="abc")))):
            with pytest.raises(RpcError) as ei:
                await coro
            assert ei.value.code == "UNIMPLEMENTED"

    asyncio.run(scenario())


def test_cancel_mid_stream_frees_blocks():
    engine, core = make(step_s=0.01)

    async def scenario():
        agen = core.generate(pb.GenerateRequest(prompt_token_ids=[5], request_id="c1",
                                                sampling=pb.SamplingParams(max_tokens=1000)))
        got = 0
        async for _ in agen:
            got += 1
            if got == 3:
                break
        await agen.aclose()
        for _ in range(100):
            if engine.free_blocks == engine.num_total_blocks and not engine.running:
                break
            await asyncio.sleep(0.01)
        return got

    assert asyncio.run(scenario()) == 3
    assert engine.free_blocks == engine.num_total_blocks and not engine.running and not engine.waiting


def test_no_replica_accepting_is_unavailable():
    class NeverClient(LocalClient):
        def stream(self, method, *args, routing):
            async def never():
                await asyncio.sleep(3600)
                yield {}
            return _LocalStream(never())

    core = IngressCore(NeverClient(None), unavailable_timeout_s=0.2)
    with pytest.raises(RpcError) as ei:
        asyncio.run(collect(core.generate(pb.GenerateRequest(prompt="x"))))
    assert ei.value.code == "UNAVAILABLE"


def test_model_info():
    engine, core = make()
    info = asyncio.run(core.get_model_info(pb.GetModelInfoRequest()))
    assert (info.model, info.vocab_size, info.num_total_blocks, info.num_free_blocks) == ("fake", 100, 64, 64)
    assert info.num_replicas == 1 and info.extra["replica"] == "r0" and info.extra["sessions_active"] == "0"
