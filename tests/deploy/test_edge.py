"""The edge (issue 20) without Ray: API keys, tenant scoping of sessions, limits and quotas, through
IngressCore + EngineWorker + the engine test double (the real Serve path is in test_edge_serve.py)."""

import asyncio

import pytest
from memserve.deploy import memserve_pb2 as pb
from memserve.deploy.auth import ApiKeys, parse_keys
from memserve.deploy.ingress import IngressCore, RpcError
from memserve.deploy.limits import Limits
from memserve.deploy.worker import EngineWorker
from serving_fake_engine import FakeAsyncEngine, FakeSampling
from serving_testlib import LocalClient

KEY_A, KEY_B = "a" * 20 + "-alpha-key", "b" * 20 + "-beta-key"
KEYS = f"# tenants\nalpha {KEY_A}\n\nbeta {KEY_B}\n"


def make(limits=None, keys=KEYS, **engine_kw):
    engine = FakeAsyncEngine(**engine_kw)
    worker = EngineWorker(engine, model_name="fake", replica="r0", sampling_cls=FakeSampling)
    core = IngressCore(LocalClient(worker), unavailable_timeout_s=2.0, sampling_cls=FakeSampling,
                       limits=limits or Limits(), keys=ApiKeys(parse_keys(keys)) if keys else None)
    return engine, core


async def collect(agen):
    return [m async for m in agen]


def code_of(coro_or_agen):
    async def run():
        if hasattr(coro_or_agen, "__aiter__"):
            return await collect(coro_or_agen)
        return await coro_or_agen
    with pytest.raises(RpcError) as ei:
        asyncio.run(run())
    return ei.value.code, ei.value.details


@pytest.mark.parametrize("auth", [None, "", "Bearer", "Basic " + KEY_A, "Bearer " + KEY_A[:-1], "Bearer " + KEY_A + "x",
                                  "Bearer wrong-key-wrong-key-wrong"])
def test_missing_or_wrong_key_is_unauthenticated(auth):
    _, core = make()
    with pytest.raises(RpcError) as ei:
        core.authenticate(auth)
    assert ei.value.code == "UNAUTHENTICATED" and ei.value.details.startswith("authorization:")


def test_keys_map_to_tenants_and_no_keys_is_default():
    _, core = make()
    assert core.authenticate("Bearer " + KEY_A) == "alpha"
    assert core.authenticate("bearer  " + KEY_B + " ") == "beta"
    _, open_core = make(keys=None)
    assert open_core.authenticate(None) == "default"


@pytest.mark.parametrize("text, msg", [("alpha", "expected 'TENANT KEY'"), ("al:pha " + KEY_A, "must match"),
                                       ("alpha short", "at least 16"), ("# only a comment\n", "no 'TENANT KEY'")])
def test_bad_keys_file_names_the_line(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_keys(text)


def test_other_tenants_session_is_exactly_an_unknown_one():
    engine, core = make()

    async def scenario():
        await collect(core.ingest(pb.IngestRequest(session_id="doc", text="x" * 16), tenant="alpha"))
        mine = await core.get_session(pb.GetSessionRequest(session_id="doc"), tenant="alpha")
        assert mine.session_id == "doc" and mine.num_tokens == 16
        assert await engine.resident_sessions() == ["alpha:doc"]  # internal ids inside
        outcomes = {}
        for sid in ("doc", "never-made"):
            for name, coro in (("get", lambda s: core.get_session(pb.GetSessionRequest(session_id=s), tenant="beta")),
                               ("delete", lambda s: core.delete_session(pb.DeleteSessionRequest(session_id=s), tenant="beta"))):
                with pytest.raises(RpcError) as ei:
                    await coro(sid)
                outcomes[(name, sid)] = (ei.value.code, ei.value.details.replace(sid, "<id>"))
        assert outcomes[("get", "doc")] == outcomes[("get", "never-made")]
        assert outcomes[("delete", "doc")] == outcomes[("delete", "never-made")]
        assert outcomes[("get", "doc")][0] == "NOT_FOUND" and "beta" not in outcomes[("get", "doc")][1]
        # beta opening its own "doc" does not touch alpha's
        await collect(core.ingest(pb.IngestRequest(session_id="doc", text="y" * 8), tenant="beta"))
        assert (await core.get_session(pb.GetSessionRequest(session_id="doc"), tenant="beta")).num_tokens == 8
        assert (await core.get_session(pb.GetSessionRequest(session_id="doc"), tenant="alpha")).num_tokens == 16
        msgs = await collect(core.generate(pb.GenerateRequest(prompt="q", session_id="doc", request_id="r1",
                                                              sampling=pb.SamplingParams(max_tokens=2)), tenant="alpha"))
        assert msgs[0].request_id == "r1"

    asyncio.run(scenario())


@pytest.mark.parametrize("sid", ["a/b", "../x", "a:b", "", "x" * 129, "é", "a b", "a\x00"])
def test_bad_session_ids_are_invalid_argument_naming_the_rule(sid):
    _, core = make(keys=None)
    reqs = [core.get_session(pb.GetSessionRequest(session_id=sid)),
            core.ingest(pb.IngestRequest(session_id=sid, text="abc"))]
    if sid:
        reqs.append(core.generate(pb.GenerateRequest(prompt="x", session_id=sid)))
    for r in reqs:
        code, details = code_of(r)
        assert code == "INVALID_ARGUMENT" and details.startswith("session_id:")
        assert "[A-Za-z0-9._-]" in details


LIMITS = Limits(max_tokens=64, max_prompt_bytes=100, max_prompt_tokens=50, max_messages=3, max_stop=2, max_stop_len=5,
                max_stop_token_ids=2, max_ingest_bytes=200, max_request_bytes=2048)


@pytest.mark.parametrize("req, field, limit", [
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(max_tokens=65)), "sampling.max_tokens", "max_tokens"),
    (pb.GenerateRequest(prompt="é" * 51), "prompt", "max_prompt_bytes"),
    (pb.GenerateRequest(prompt_token_ids=[1] * 51), "prompt_token_ids", "max_prompt_tokens"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x")] * 4), "messages", "max_messages"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x" * 60)] * 2), "messages", "max_prompt_bytes"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(stop=["a", "b", "c"])), "sampling.stop", "max_stop"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(stop=["abcdef"])), "sampling.stop[0]", "max_stop_len"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(stop_token_ids=[1, 2, 3])), "sampling.stop_token_ids",
     "max_stop_token_ids"),
    (pb.GenerateRequest(prompt_token_ids=[1] * 40, request_id="r" * 100, sampling=pb.SamplingParams(stop=["a"] * 2)),
     None, None),
])
def test_limits_name_the_limit_and_value(req, field, limit):
    _, core = make(limits=LIMITS, keys=None)
    if field is None:  # within every bound
        assert asyncio.run(collect(core.generate(req)))[-1].finish_reason == "length"
        return
    code, details = code_of(core.generate(req))
    assert code == "INVALID_ARGUMENT" and details.startswith(field + ":"), details
    assert f"(limit {limit})" in details and "at most" in details


def test_request_size_and_ingest_bytes():
    _, core = make(limits=LIMITS, keys=None)
    code, details = code_of(core.ingest(pb.IngestRequest(session_id="d", text="x" * 201)))
    assert (code, details.split(":")[0]) == ("INVALID_ARGUMENT", "text") and "max_ingest_bytes" in details
    big = pb.IngestRequest(session_id="d", token_ids=[2 ** 30] * 500)  # 5 bytes per varint
    assert big.ByteSize() > 2048
    code, details = code_of(core.ingest(big))
    assert code == "RESOURCE_EXHAUSTED" and details.startswith("request:") and "(limit max_request_bytes)" in details
    code, details = code_of(core.generate(pb.GenerateRequest(prompt_token_ids=[2 ** 30] * 500)))
    assert code == "RESOURCE_EXHAUSTED" and "max_request_bytes" in details


def test_max_tokens_default_caps_are_the_kv_memory_cap_or_the_context():
    _, core = make(keys=None)  # KV memory on (the engine's default): max_tokens_kv_memory
    code, details = code_of(core.generate(pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(max_tokens=10 ** 9))))
    assert code == "INVALID_ARGUMENT" and "at most 8192 (limit max_tokens_kv_memory), got 1000000000" in details
    core.kv_memory = False  # the fake's max_model_len is 2048
    code, details = code_of(core.generate(pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(max_tokens=2049))))
    assert "at most 2048" in details and "max_model_len" in details


def test_tenant_quotas_sessions_and_streams():
    engine, core = make(limits=Limits(max_sessions_per_tenant=2, max_streams_per_tenant=1), step_s=0.01)

    async def scenario():
        for s in ("s1", "s2"):
            await collect(core.ingest(pb.IngestRequest(session_id=s, text="abcd"), tenant="alpha"))
        with pytest.raises(RpcError) as ei:
            await collect(core.ingest(pb.IngestRequest(session_id="s3", text="abcd"), tenant="alpha"))
        assert ei.value.code == "RESOURCE_EXHAUSTED" and "max_sessions_per_tenant" in ei.value.details
        await collect(core.ingest(pb.IngestRequest(session_id="s3", text="abcd"), tenant="beta"))  # beta's own quota
        await collect(core.ingest(pb.IngestRequest(session_id="s1", text="more"), tenant="alpha"))  # existing: fine
        await core.delete_session(pb.DeleteSessionRequest(session_id="s1"), tenant="alpha")
        await collect(core.ingest(pb.IngestRequest(session_id="s3", text="abcd"), tenant="alpha"))
        # one stream per tenant: a second concurrent one is refused, another tenant's is not
        agen = core.generate(pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(max_tokens=50)), tenant="alpha")
        await agen.__anext__()
        with pytest.raises(RpcError) as ei:
            await collect(core.generate(pb.GenerateRequest(prompt="x"), tenant="alpha"))
        assert ei.value.code == "RESOURCE_EXHAUSTED" and "max_streams_per_tenant" in ei.value.details
        assert (await collect(core.generate(pb.GenerateRequest(prompt="x"), tenant="beta")))[-1].finish_reason
        await agen.aclose()
        assert (await collect(core.generate(pb.GenerateRequest(prompt="x"), tenant="alpha")))[-1].finish_reason

    asyncio.run(scenario())


def test_memory_bytes_quota():
    _, core = make(limits=Limits(max_memory_bytes_per_tenant=8000))  # the fake reports 4096 B per session

    async def scenario():
        for s in ("m1", "m2"):
            await collect(core.ingest(pb.IngestRequest(session_id=s, text="abcd"), tenant="alpha"))
        with pytest.raises(RpcError) as ei:
            await collect(core.ingest(pb.IngestRequest(session_id="m3", text="abcd"), tenant="alpha"))
        assert ei.value.code == "RESOURCE_EXHAUSTED" and "max_memory_bytes_per_tenant" in ei.value.details

    asyncio.run(scenario())
