"""The OpenAI-compatible HTTP API end to end: the official `openai` Python client against a real
local Ray Serve application (Serve's HTTP proxy -> the ingress deployment's `__call__` -> the engine
deployment), with the gRPC API of the same application as the reference.

One Ray cluster for the module with two applications: "memserve" (route "/") on a tiny
random-weight Llama, where answers are compared with gRPC's for the same request and seed, and
"fake" (route "/fake", the engine test double behind max_ongoing_requests=1 and a 1.5 s
unavailable timeout) to provoke "no replica can take it" (503).
"""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import pytest
from memserve.deploy import memserve_pb2 as pb
from memserve.deploy import memserve_pb2_grpc as pbg
from serving_testlib import free_port as _free_port
from serving_testlib import wait_for as _wait

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
try:  # the raw HTTP client the openai package itself uses (httpx2 for openai>=3, httpx before)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINE_ARGS = {"max_num_seqs": 3, "num_kv_blocks": 128, "block_size": 16, "progress": False}
MAX_WAITING = 3  # = the largest n below: a request's choices all fit in the waiting queue


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from memserve.deploy import metrics as M
    from memserve.deploy.app import SERVE_ENV, build_app, init_ray, start
    from memserve.deploy.config import AppConfig
    from ray import serve
    from tiny_models import make_tiny_model

    model_dir = str(make_tiny_model(tmp_path_factory.mktemp("openai_tiny"), arch="llama"))
    saved_env = {k: os.environ.get(k) for k in SERVE_ENV}
    metrics_dir = M.make_multiproc_dir()
    cfg = AppConfig(model=model_dir, max_waiting=MAX_WAITING, metrics_dir=metrics_dir, unavailable_timeout_s=60,
                    router_seed=0, engine_args=dict(ENGINE_ARGS))
    grpc_port, http_port = _free_port(), _free_port()
    init_ray(num_cpus=2, log_to_driver=False, logging_level="ERROR")
    try:
        start(cfg, grpc_port=grpc_port, http_port=http_port)
        fake = AppConfig(app_name="fake", model="fake", engine_cls="serving_fake_engine:FakeAsyncEngine",
                         sampling_cls="serving_fake_engine:FakeSampling", env_vars={"PYTHONPATH": HERE},
                         engine_args={"step_s": 0.01}, max_ongoing_requests=1, unavailable_timeout_s=1.5,
                         graceful_shutdown_timeout_s=0.5)
        serve.run(build_app(fake), name="fake", route_prefix="/fake")
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = pbg.MemServeStub(channel)
        base = f"http://127.0.0.1:{http_port}"
        _wait(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60, metadata=(("application", "memserve"),)),
              60, "the app")
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        name = client.models.list().data[0].id
        yield {"stub": stub, "client": client, "base": base, "name": name, "metrics_dir": metrics_dir,
               "grpc_port": grpc_port}
        channel.close()
    finally:
        ray.shutdown()  # the local cluster is ours; serve.shutdown() first waits ~30 s for a graceful drain
        M.cleanup_dir(metrics_dir)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


MD = (("application", "memserve"),)


def _grpc(stub, **req):
    msgs = list(stub.Generate(pb.GenerateRequest(**req), timeout=120, metadata=MD))
    return "".join(m.text for m in msgs), msgs[-1].finish_reason, msgs[-1].usage


def _free_blocks(stub) -> tuple[int, int, int]:
    mi = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60, metadata=MD)
    return mi.num_free_blocks, mi.num_running, mi.num_waiting


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three rivers."}]
SAMPLINGS = [{"max_tokens": 12, "temperature": 0.0}, {"max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "seed": 1234}]


# ---- equality with gRPC -------------------------------------------------------------------------

def test_models_lists_the_served_model(app):
    mi = app["stub"].GetModelInfo(pb.GetModelInfoRequest(), timeout=60, metadata=MD)
    models = app["client"].models.list().data
    assert [m.id for m in models] == [mi.model]
    assert models[0].owned_by == "memserve"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "seeded"])
def test_chat_equals_grpc(app, sampling, stream):
    ref_text, ref_fin, ref_usage = _grpc(app["stub"], messages=[pb.ChatMessage(**m) for m in CHAT],
                                         sampling=pb.SamplingParams(**sampling))
    c = app["client"]
    if stream:
        chunks = list(c.chat.completions.create(model=app["name"], messages=CHAT, stream=True,
                                                stream_options={"include_usage": True}, **sampling))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        fins = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
        assert fins[-1] == ref_fin and all(f is None for f in fins[:-1])
        assert all(ch.usage is None for ch in chunks[:-1])
        assert chunks[-1].choices == []
        usage = chunks[-1].usage
        assert len({ch.id for ch in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    else:
        r = c.chat.completions.create(model=app["name"], messages=CHAT, **sampling)
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        text, usage = r.choices[0].message.content, r.usage
        assert r.choices[0].finish_reason == ref_fin
    assert text == ref_text
    assert (usage.prompt_tokens, usage.completion_tokens) == (ref_usage.prompt_tokens, ref_usage.completion_tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == ref_usage.cached_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_completion_equals_grpc(app, stream):
    prompt, sampling = "The quick brown fox jumps over", SAMPLINGS[1]
    ref_text, ref_fin, ref_usage = _grpc(app["stub"], prompt=prompt, sampling=pb.SamplingParams(**sampling))
    c = app["client"]
    if stream:
        chunks = list(c.completions.create(model=app["name"], prompt=prompt, stream=True, **sampling))
        text = "".join(ch.choices[0].text for ch in chunks)
        assert chunks[-1].choices[0].finish_reason == ref_fin
        assert all(ch.usage is None for ch in chunks)  # no include_usage: no usage chunk
        assert len(chunks) > 2  # streamed, not one body
    else:
        r = c.completions.create(model=app["name"], prompt=prompt, **sampling)
        assert r.object == "text_completion"
        text = r.choices[0].text
        assert r.choices[0].finish_reason == ref_fin
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref_usage.prompt_tokens, ref_usage.completion_tokens)
    assert text == ref_text
    # the return_token_ids extension (the benchmark counts tokens per chunk with it): gRPC's ids
    ref_ids = [t for m in app["stub"].Generate(pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(**sampling)),
                                               timeout=120, metadata=MD) for t in m.token_ids]
    kw = dict(model=app["name"], prompt=prompt, extra_body={"return_token_ids": True}, **sampling)
    if stream:
        ids = [t for ch in c.completions.create(stream=True, **kw) for t in ch.choices[0].to_dict()["token_ids"]]
    else:
        ids = c.completions.create(**kw).choices[0].to_dict()["token_ids"]
    assert ids == ref_ids
    # token ids as the prompt, max_completion_tokens on chat: the same request shapes gRPC has
    r = c.completions.create(model=app["name"], prompt=[1, 2, 3, 4], max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == 4 and r.choices[0].text == _grpc(
        app["stub"], prompt_token_ids=[1, 2, 3, 4], sampling=pb.SamplingParams(max_tokens=3, temperature=0))[0]
    r = c.chat.completions.create(model=app["name"], messages=CHAT, max_completion_tokens=5, temperature=0)
    assert r.usage.completion_tokens <= 5


def test_n_choices_are_seeded_requests(app):
    c = app["client"]
    r = c.chat.completions.create(model=app["name"], messages=CHAT, n=3, max_tokens=8, temperature=1.0, seed=7)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    refs = [_grpc(app["stub"], messages=[pb.ChatMessage(**m) for m in CHAT],
                  sampling=pb.SamplingParams(max_tokens=8, temperature=1.0, seed=7 + i)) for i in range(3)]
    assert [ch.message.content for ch in r.choices] == [t for t, _, _ in refs]
    assert r.usage.prompt_tokens == refs[0][2].prompt_tokens
    assert r.usage.completion_tokens == sum(u.completion_tokens for _, _, u in refs)
    # streamed: every index gets its own deltas, and the same texts
    chunks = list(c.chat.completions.create(model=app["name"], messages=CHAT, n=3, max_tokens=8, temperature=1.0,
                                            seed=7, stream=True))
    texts = ["", "", ""]
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [t for t, _, _ in refs]


def test_stop_strings(app):
    c = app["client"]
    full = c.completions.create(model=app["name"], prompt="Once upon a time", max_tokens=24, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    words = [w for w in full[len(full) // 3:].split() if len(w) >= 2]
    assert words, full
    stop = words[0]
    kw = dict(model=app["name"], prompt="Once upon a time", max_tokens=24, temperature=0, stop=[stop, "\x00never"],
              extra_body={"ignore_eos": True})
    for stream in (False, True):
        if stream:
            chunks = list(c.completions.create(stream=True, **kw))
            text, fin = "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason
        else:
            r = c.completions.create(**kw)
            text, fin = r.choices[0].text, r.choices[0].finish_reason
        assert fin == "stop"
        assert text == full[:full.index(stop)]  # the text up to, not including, the stop string
        ref = _grpc(app["stub"], prompt="Once upon a time", sampling=pb.SamplingParams(
            max_tokens=24, temperature=0, stop=[stop, "\x00never"], ignore_eos=True))
        assert (text, fin) == ref[:2]


def test_session_continued_over_http(app):
    stub, c = app["stub"], app["client"]
    doc = "The lighthouse keeper's logbook lists the ships that passed the cape each night. " * 6
    prog = list(stub.Ingest(pb.IngestRequest(session_id="http-doc", text=doc), timeout=120, metadata=MD))
    assert prog[-1].done
    before = stub.GetSession(pb.GetSessionRequest(session_id="http-doc"), timeout=60, metadata=MD).num_tokens
    r = c.completions.create(model=app["name"], prompt=" Question: what does the logbook list? Answer:", max_tokens=4,
                             temperature=0, extra_body={"session_id": "http-doc"})
    assert r.choices[0].finish_reason in ("stop", "length")
    after = stub.GetSession(pb.GetSessionRequest(session_id="http-doc"), timeout=60, metadata=MD).num_tokens
    # the session's tokens are the request's cached prefix; the question (and answer) were added to them
    assert r.usage.prompt_tokens_details.cached_tokens == before
    assert after >= r.usage.prompt_tokens > before
    # top-level session_id in the JSON body is the same thing (extra_body is merged into the body)
    raw = httpx.post(app["base"] + "/v1/chat/completions", json={
        "model": app["name"], "session_id": "http-doc", "max_tokens": 2,
        "messages": [{"role": "user", "content": "And then?"}]}, timeout=120)
    assert raw.status_code == 200, raw.text
    assert stub.GetSession(pb.GetSessionRequest(session_id="http-doc"), timeout=60, metadata=MD).num_tokens > after
    stub.DeleteSession(pb.DeleteSessionRequest(session_id="http-doc"), timeout=60, metadata=MD)


# ---- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, fields, param", [
    ("chat", {"temperature": -1}, "temperature"),
    ("chat", {"top_p": 1.5}, "top_p"),
    ("chat", {"max_tokens": 0}, "max_tokens"),
    ("chat", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("chat", {"n": 9}, "n"),
    ("chat", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("chat", {"messages": None}, "messages"),
    ("chat", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"logprobs": True}, "logprobs"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ("completion", {"prompt": [10**9]}, "prompt[0]"),
    ("completion", {"prompt": ["a", "b"]}, "prompt"),
    ("completion", {"seed": "abc"}, "seed"),
])
def test_bad_field_is_400_naming_it(app, kind, fields, param):
    body = {"model": app["name"], "max_tokens": 2}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if kind == "chat" else {"prompt": "hi"})
    body.update(fields)
    body = {k: v for k, v in body.items() if v is not None}
    if "max_completion_tokens" in fields:
        body.pop("max_tokens")
    c = app["client"]
    if "messages" not in body and kind == "chat":  # the client itself refuses this one: send it raw
        r = httpx.post(app["base"] + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400
        err = r.json()["error"]
    else:
        with pytest.raises(openai.BadRequestError) as ei:
            if kind == "chat":
                c.chat.completions.create(**body)
            else:
                c.completions.create(**body)
        assert ei.value.status_code == 400
        err = ei.value.body
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert err["message"].startswith(param + ":"), err
    assert err["message"] != param + ":"
    # and streamed requests fail the same way, before the stream starts
    r = httpx.post(app["base"] + ("/v1/chat/completions" if kind == "chat" else "/v1/completions"),
                   json={**body, "stream": True}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_unknown_model_and_session_are_404(app):
    c = app["client"]
    with pytest.raises(openai.NotFoundError) as ei:
        c.chat.completions.create(model="gpt-17", messages=CHAT, max_tokens=2)
    assert ei.value.body["param"] == "model" and ei.value.body["code"] == "model_not_found"
    # memserve's engine opens a session on first use; an engine that only continues existing ones
    # (the test double) answers NOT_FOUND, which HTTP maps to 404
    fake = openai.OpenAI(base_url=app["base"] + "/fake/v1", api_key="unused", max_retries=0, timeout=60)
    _wait(lambda: _try(fake.models.list), 60, "the fake app")
    with pytest.raises(openai.NotFoundError) as ei:
        fake.completions.create(model="fake", prompt="x", max_tokens=2, extra_body={"session_id": "no-such"})
    assert ei.value.body["param"] == "session_id" and "no-such" in ei.value.body["message"]
    r = httpx.get(app["base"] + "/v1/nothing-here", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(app["base"] + "/v1/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"


def test_backpressure_is_429_and_server_recovers(app):
    start_free = _free_blocks(app["stub"])[0]
    n = ENGINE_ARGS["max_num_seqs"] + MAX_WAITING + 3

    async def flood():
        ac = openai.AsyncOpenAI(base_url=app["base"] + "/v1", api_key="unused", max_retries=0, timeout=120)

        async def one(i):
            try:
                s = await ac.completions.create(model=app["name"], prompt=f"flood {i}", max_tokens=60, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
                async for _ in s:
                    pass
                return 200
            except openai.APIStatusError as e:
                return e.status_code

        try:
            return await asyncio.gather(*(one(i) for i in range(n)))
        finally:
            await ac.close()

    codes = asyncio.run(flood())
    assert 429 in codes and codes.count(200) >= ENGINE_ARGS["max_num_seqs"], codes
    assert set(codes) <= {200, 429}, codes
    _wait(lambda: _free_blocks(app["stub"]) == (start_free, 0, 0), 30, "idle pool after the flood")
    assert app["client"].completions.create(model=app["name"], prompt="still there?", max_tokens=2).choices[0].finish_reason


def test_no_replica_is_503(app):
    """The "fake" app's single engine replica takes one request at a time (max_ongoing_requests=1);
    while a long one runs, the next waits in the router and gives up after unavailable_timeout_s."""
    fake = openai.OpenAI(base_url=app["base"] + "/fake/v1", api_key="unused", max_retries=0, timeout=60)
    assert _wait(lambda: _try(fake.models.list), 60, "the fake app").data[0].id == "fake"
    long = fake.completions.create(model="fake", prompt="x", max_tokens=1500, stream=True)
    next(iter(long))  # it holds the replica now
    try:
        t0 = time.time()
        with pytest.raises(openai.APIStatusError) as ei:
            fake.completions.create(model="fake", prompt="y", max_tokens=2)
        assert ei.value.status_code == 503 and ei.value.body["type"] == "service_unavailable", ei.value.body
        assert time.time() - t0 < 20
    finally:
        long.close()
    _wait(lambda: _try(lambda: fake.completions.create(model="fake", prompt="z", max_tokens=2)), 30, "the fake app to recover")


def _try(fn):
    try:
        return fn()
    except openai.APIStatusError:
        return None


# ---- disconnects and metrics --------------------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_and_frees_blocks(app, stream):
    stub = app["stub"]
    start_free = _free_blocks(stub)[0]
    body = {"model": app["name"], "prompt": "tell me everything", "max_tokens": 1500, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    if stream:
        with httpx.stream("POST", app["base"] + "/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [ln for ln in (next(lines) for _ in range(6)) if ln.startswith("data: ")]
            assert got
            assert _free_blocks(stub)[0] < start_free  # the request holds blocks while it runs
    else:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(app["base"] + "/v1/completions", json=body, timeout=1.5)
    # the client is gone: the engine aborts the request and its KV blocks return to the pool
    _wait(lambda: _free_blocks(stub) == (start_free, 0, 0), 30, "the pool to return to its starting count")


def test_metrics_carry_the_api_label(app):
    from memserve.deploy import metrics as M

    app["client"].completions.create(model=app["name"], prompt="count me", max_tokens=3)
    from prometheus_client.parser import text_string_to_metric_families

    def samples():
        out = {}
        for fam in text_string_to_metric_families(M.render(app["metrics_dir"]).decode()):
            for s in fam.samples:
                key = (s.name, s.labels.get("api"), s.labels.get("code"))
                out[key] = out.get(key, 0) + s.value
        return out

    s = _wait(lambda: (x := samples()).get(("memserve:generation_tokens_total", "http", None)) and x, 15, "http series")
    assert s[("memserve:generation_tokens_total", "grpc", None)] > 0  # the gRPC references above
    assert s[("memserve:time_to_first_token_seconds_count", "http", None)] > 0
    assert s[("memserve:request_errors_total", "http", "INVALID_ARGUMENT")] > 0


def test_direct_topology_serves_http(app):
    """Topology "direct": the engine replicas are the ingress, so Serve's proxy calls their `__call__`."""
    from memserve.deploy.app import build_app
    from memserve.deploy.config import AppConfig
    from ray import serve

    cfg = AppConfig(app_name="direct", model="fake", topology="direct", engine_cls="serving_fake_engine:FakeAsyncEngine",
                    sampling_cls="serving_fake_engine:FakeSampling", env_vars={"PYTHONPATH": HERE},
                    engine_args={"step_s": 0.001}, graceful_shutdown_timeout_s=0.5)
    serve.run(build_app(cfg), name="direct", route_prefix="/direct")
    try:
        c = openai.OpenAI(base_url=app["base"] + "/direct/v1", api_key="unused", max_retries=0, timeout=60)
        assert _wait(lambda: _try(c.models.list), 60, "the direct app").data[0].id == "fake"
        r = c.completions.create(model="fake", prompt=[1, 2, 3], max_tokens=5)
        # the test double's tokens: (sum(prompt) + 7 i) % 100, text "<id>"
        assert r.choices[0].text == "".join(f"<{(6 + 7 * i) % 100}>" for i in range(5))
        chunks = list(c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                                stream=True))
        assert chunks[-1].choices[0].finish_reason == "length"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks).count("<") == 4
    finally:
        serve.delete("direct", _blocking=False)
