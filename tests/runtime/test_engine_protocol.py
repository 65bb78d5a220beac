"""Conformance of the ServingEngine contract (runtime/engine_protocol.py): ONE test module, run against
the real AsyncLLMEngine (tiny random-weight Llama, KV memory on, a snapshot store in a tmp dir) and the
serving test double (tests/deploy/serving_fake_engine.py), so the double the serving tests rely on
cannot drift from the engine. Each test states an observable rule of the contract; where the two
differ, the test fails for one of them.

Fault injection is the only implementation-specific part (`Impl.break_steps`): the real engine's model
forward raises, the double's next token steps raise.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from memserve.runtime.engine_protocol import OutputLike, ServingEngine, StatsLike
from memserve.runtime.errors import (
    EngineDrainingError,
    EngineStepError,
    InvalidRequestError,
    QueueFullError,
    SessionNotFoundError,
    SessionsUnsupportedError,
)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "deploy"))

KV_CFG = {"n_init": 4, "n_local": 32, "block_size": 8, "repr_topk": 2, "chunk_size": 24, "key_group": 8,
          "value_group": 8, "topk": 10_000, "compression": "none"}


@dataclass
class Impl:
    kind: str
    make: Any  # (sessions=True, **kw) -> ServingEngine
    sampling: Any  # the SamplingParams class the engine takes
    break_steps: Any  # (engine, n): the next n steps' forward raises


def _real(tiny_llama_dir, tmp_path) -> Impl:
    from memserve.runtime.async_engine import AsyncLLMEngine
    from memserve.runtime.sampling import SamplingParams
    from tiny_models import fail_next_forwards

    def make(sessions=True, max_waiting=4, max_running=2):
        mem = ({"kv_memory": "auto", "kv_memory_config": KV_CFG, "session_store": str(tmp_path / "store")}
               if sessions else {"kv_memory": "off"})
        return AsyncLLMEngine(str(tiny_llama_dir), max_waiting=max_waiting, progress=False,
                              max_num_seqs=max_running, num_kv_blocks=64, block_size=4, **mem)

    def break_steps(eng, n):
        fail_next_forwards(eng.engine, lambda: RuntimeError("injected forward failure"))["n"] = n

    return Impl("real", make, SamplingParams, break_steps)


def _fake() -> Impl:
    from serving_fake_engine import FakeAsyncEngine, FakeSampling

    def make(sessions=True, max_waiting=4, max_running=2):
        return FakeAsyncEngine("fake", max_waiting=max_waiting, max_running=max_running, step_s=0.002,
                               sessions=sessions, open_unknown_sessions=True)

    return Impl("fake", make, FakeSampling, lambda eng, n: eng.fail_steps(n))


@pytest.fixture(params=["real", "fake"])
def impl(request, tmp_path):
    if request.param == "real":
        return _real(request.getfixturevalue("tiny_llama_dir"), tmp_path)
    return _fake()


@pytest.fixture
def engines(impl):
    made = []

    def make(**kw):
        made.append(impl.make(**kw))
        return made[-1]

    yield make
    for e in made:
        e.shutdown()


def greedy(impl, n=4, **kw):
    return impl.sampling(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


async def collect(agen):
    return [o async for o in agen]


async def until(cond, what, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


PROMPT = [11, 12, 13, 14, 15, 16, 17]


# ---- the shape of the contract ----------------------------------------------------------------------

_MEMBERS = [n for n, v in vars(ServingEngine).items() if callable(v) and (not n.startswith("_") or n == "__init__")]


def test_implements_the_protocol_with_its_signatures(impl, engines):
    eng = engines()
    assert isinstance(eng, ServingEngine)
    kinds = {"generate": inspect.isasyncgenfunction, "ingest": inspect.isasyncgenfunction,
             "abort": inspect.iscoroutinefunction, "get_session": inspect.iscoroutinefunction,
             "delete_session": inspect.iscoroutinefunction, "list_sessions": inspect.iscoroutinefunction,
             "resident_sessions": inspect.iscoroutinefunction}
    assert set(kinds) | {"__init__", "stats", "model_info", "shutdown"} == set(_MEMBERS)
    for name in _MEMBERS:
        fn = getattr(type(eng), name)
        want = kinds.get(name, lambda f: not inspect.iscoroutinefunction(f) and not inspect.isasyncgenfunction(f))
        assert want(fn), f"{impl.kind}.{name}: wrong kind (async generator / coroutine / plain)"
        proto = list(inspect.signature(getattr(ServingEngine, name)).parameters.values())[1:]
        got = list(inspect.signature(fn).parameters.values())[1:]
        for p in proto:  # every protocol parameter, same name, kind and default (extras must be optional)
            q = next((q for q in got if q.name == p.name or q.kind == p.kind == p.VAR_KEYWORD), None)
            assert q is not None, f"{impl.kind}.{name} lacks parameter {p.name!r}"
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):  # an impl may default a required one
                assert q.kind == p.kind and (p.default is p.empty or q.default == p.default), \
                    f"{impl.kind}.{name}({p.name}): {q} vs {p}"
        extra = [q for q in got if q.name not in {p.name for p in proto}
                 and q.kind not in (q.VAR_KEYWORD, q.VAR_POSITIONAL)]
        assert all(q.default is not q.empty for q in extra), f"{impl.kind}.{name}: required extras {extra}"
    tok = eng.tokenizer
    assert tok is not None and tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                  add_generation_prompt=True),
                                          add_special_tokens=False)


def test_deploy_calls_only_protocol_members():
    """deploy/ reaches the engine through `self.engine.<member>` only with members of the contract."""
    used = set()
    for path in (ROOT / "deploy").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "engine" and isinstance(node.value.value, ast.Name)
                    and node.value.value.id == "self"):
                used.add(node.attr)
    allowed = (set(_MEMBERS) - {"__init__"}) | {"tokenizer"}
    assert used and used <= allowed, f"deploy/ uses engine members outside the protocol: {used - allowed}"


# ---- generate ---------------------------------------------------------------------------------------

def test_generate_streams_one_output_per_token(impl, engines):
    eng = engines()

    async def go():
        a = await collect(eng.generate(PROMPT, greedy(impl, 5), "g1"))
        b = await collect(eng.generate(PROMPT, greedy(impl, 5), "g2"))
        c = await collect(eng.generate("hello world", greedy(impl, 2), "g3"))
        return a, b, c

    a, b, c = asyncio.run(go())
    assert all(isinstance(o, OutputLike) for o in a + c)
    assert [o.finish_reason for o in a] == [None] * 4 + ["length"]
    assert all(o.request_id == "g1" for o in a) and a[-1].prompt_token_ids == PROMPT
    assert [t for o in a for t in o.new_token_ids] == a[-1].token_ids and len(a[-1].token_ids) == 5
    assert all(o.token_ids == a[-1].token_ids[:i + 1] for i, o in enumerate(a))
    assert isinstance(a[-1].new_text, str) and a[-1].num_cached_tokens == 0
    assert a[-1].metrics.arrival_time is not None and a[-1].metrics.first_scheduled_time is not None
    assert b[-1].token_ids == a[-1].token_ids  # greedy is deterministic
    assert c[-1].finish_reason == "length" and len(c[-1].token_ids) == 2


@pytest.mark.parametrize("bad", ["empty", "out_of_vocab", "not_ids", "duplicate_id"])
def test_bad_input_raises_at_the_first_next(impl, engines, bad):
    eng = engines()
    vocab = eng.model_info()["vocab_size"]

    async def go():
        blocker = None
        prompt, rid = {"empty": [], "out_of_vocab": [1, vocab], "not_ids": [1, "x"], "duplicate_id": PROMPT}[bad], "b"
        if bad == "duplicate_id":
            blocker = eng.generate(PROMPT, greedy(impl, 200), "b")
            await blocker.__anext__()
        agen = eng.generate(prompt, greedy(impl), rid)  # creating the iterator never raises
        try:
            with pytest.raises(InvalidRequestError) as ei:
                await agen.__anext__()
            return ei.value
        finally:
            if blocker is not None:
                await blocker.aclose()

    err = asyncio.run(go())
    assert err.field in ("prompt", "request_id"), err


def test_closing_the_stream_aborts_and_frees_blocks(impl, engines):
    eng = engines()
    free0 = eng.stats().num_free_blocks

    async def go():
        agen = eng.generate(PROMPT, greedy(impl, 200), "c1")
        for _ in range(6):
            await agen.__anext__()
        during = eng.stats()
        await agen.aclose()
        await until(lambda: eng.stats().num_free_blocks == free0 and eng.stats().num_running == 0, "blocks back")
        return during

    during = asyncio.run(go())
    assert during.num_running == 1 and during.num_free_blocks < free0


def test_abort_ends_the_stream_with_abort(impl, engines):
    eng = engines()
    free0 = eng.stats().num_free_blocks

    async def go():
        agen = eng.generate(PROMPT, greedy(impl, 500), "a1")
        first = await agen.__anext__()
        await eng.abort("a1")
        await eng.abort("a1")  # idempotent
        await eng.abort("never-was")  # unknown ids are ignored
        rest = await asyncio.wait_for(collect(agen), 10)
        await until(lambda: eng.stats().num_free_blocks == free0, "blocks back")
        return [first, *rest]

    outs = asyncio.run(go())
    assert outs[-1].finish_reason == "abort" and len(outs[-1].token_ids) < 500
    assert all(o.finish_reason is None for o in outs[:-1])


def test_full_waiting_queue_is_queue_full(impl, engines):
    eng = engines(max_waiting=1, max_running=1)

    async def go():
        a = eng.generate(PROMPT, greedy(impl, 500), "q1")
        await a.__anext__()  # running
        b = asyncio.ensure_future(collect(eng.generate(PROMPT, greedy(impl, 3), "q2")))  # waits
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError):
            await eng.generate(PROMPT, greedy(impl, 3), "q3").__anext__()
        await a.aclose()
        return await asyncio.wait_for(b, 30)  # the waiting one then runs

    assert asyncio.run(go())[-1].finish_reason == "length"


# ---- sessions ---------------------------------------------------------------------------------------

def test_session_lifecycle(impl, engines):
    eng = engines()
    doc = list(range(20, 60))

    async def go():
        prog = await collect(eng.ingest("t:s1", doc))
        info0 = await eng.get_session("t:s1")
        listed = await eng.list_sessions()
        resident = await eng.resident_sessions()
        outs = await collect(eng.generate(PROMPT, greedy(impl, 3), "s-g1", session_id="t:s1"))
        info1 = await eng.get_session("t:s1")
        more = await collect(eng.ingest("t:s1", [5, 6, 7, 8]))  # appends
        fresh = await collect(eng.generate(PROMPT, greedy(impl, 2), "s-g2", session_id="t:new"))  # opens it
        info_new = await eng.get_session("t:new")
        await eng.delete_session("t:s1")
        errs = []
        for call in (lambda: eng.get_session("t:s1"), lambda: eng.delete_session("t:s1"),
                     lambda: eng.get_session("t:never")):
            with pytest.raises(SessionNotFoundError) as ei:
                await call()
            errs.append(ei.value)
        after = ({s["session_id"] for s in await eng.list_sessions()}, await eng.resident_sessions())
        return prog, info0, listed, resident, outs, info1, more, fresh, info_new, errs, after

    prog, info0, listed, resident, outs, info1, more, fresh, info_new, errs, after = asyncio.run(go())
    assert all({"tokens_done", "tokens_total"} <= set(p) for p in prog)
    assert prog[-1]["done"] is True and prog[-1]["tokens_done"] == prog[-1]["tokens_total"] == len(doc)
    assert not any(p.get("done") for p in prog[:-1])
    assert info0["session_id"] == "t:s1" and info0["num_tokens"] == len(doc) and info0["busy"] is False
    assert all(isinstance(v, int) for v in info0["bytes"].values()) and sum(info0["bytes"].values()) > 0  # per tier
    assert [s["session_id"] for s in listed] == ["t:s1"] and resident == ["t:s1"]
    assert outs[-1].finish_reason == "length" and 0 < outs[-1].num_cached_tokens <= len(doc)
    assert info1["num_tokens"] >= len(doc) + len(PROMPT) + 2
    assert more[-1]["done"] and more[-1]["tokens_done"] >= info1["num_tokens"] + 3
    assert fresh[-1].finish_reason == "length" and info_new["num_tokens"] >= len(PROMPT)
    assert all("t:s1" in str(e) or "t:never" in str(e) for e in errs)
    assert after == ({"t:new"}, ["t:new"])


def test_a_session_runs_one_request_at_a_time(impl, engines):
    eng = engines()

    async def go():
        await collect(eng.ingest("t:busy", list(range(30, 50))))
        a = eng.generate(PROMPT, greedy(impl, 300), "b1", session_id="t:busy")
        await a.__anext__()
        with pytest.raises(InvalidRequestError) as ei:
            await eng.generate(PROMPT, greedy(impl, 3), "b2", session_id="t:busy").__anext__()
        await a.aclose()
        return ei.value

    assert asyncio.run(go()).field == "session_id"


def test_engine_without_sessions(impl, engines):
    eng = engines(sessions=False)

    async def go():
        for call in (lambda: eng.get_session("t:s"), lambda: eng.delete_session("t:s"), eng.list_sessions,
                     lambda: collect(eng.ingest("t:s", [1, 2, 3])),
                     lambda: collect(eng.generate(PROMPT, greedy(impl), "ns", session_id="t:s"))):
            with pytest.raises(SessionsUnsupportedError):
                await call()
        return await eng.resident_sessions(), await collect(eng.generate(PROMPT, greedy(impl, 2), "ok"))

    resident, outs = asyncio.run(go())
    assert resident == [] and outs[-1].finish_reason == "length"


# ---- stats, model info, health, drain ---------------------------------------------------------------

def test_stats_and_model_info(impl, engines):
    eng = engines()
    info = eng.model_info()
    assert {"name", "vocab_size", "max_model_len", "block_size"} <= set(info) and info["vocab_size"] > 0

    async def go():
        await collect(eng.ingest("t:st", list(range(10, 30))))
        agen = eng.generate(PROMPT, greedy(impl, 200), "st1")
        await agen.__anext__()
        st = eng.stats()
        await agen.aclose()
        return st

    st = asyncio.run(go())
    assert isinstance(st, StatsLike)
    for name, typ in (("num_running", int), ("num_waiting", int), ("kv_cache_usage_perc", float),
                      ("num_free_blocks", int), ("num_total_blocks", int), ("kv_memory_bytes", dict),
                      ("sessions_active", int), ("blocks_retrieved_total", int), ("memory_lookups_total", int),
                      ("memory_lookup_seconds_total", float), ("memory_lookup_layers", dict)):
        assert isinstance(getattr(st, name), typ), (name, getattr(st, name))
    assert st.num_running == 1 and st.num_waiting == 0 and st.sessions_active == 1
    assert 0 <= st.num_free_blocks < st.num_total_blocks and 0.0 < st.kv_cache_usage_perc <= 1.0
    assert st.kv_memory_bytes.get("device", 0) > 0


def test_failing_steps_fail_their_requests_then_health(impl, engines):
    eng = engines()
    free0 = eng.stats().num_free_blocks

    async def go():
        agen = eng.generate(PROMPT, greedy(impl, 200), "f1")
        await agen.__anext__()
        impl.break_steps(eng, 1)
        with pytest.raises(EngineStepError):
            await asyncio.wait_for(collect(agen), 10)
        healthy = eng.stats()  # one failing step: still healthy
        ok = await collect(eng.generate(PROMPT, greedy(impl, 2), "f2"))
        impl.break_steps(eng, 3)
        for i in range(3):
            with pytest.raises(EngineStepError):
                await asyncio.wait_for(collect(eng.generate(PROMPT, greedy(impl, 2), f"f3-{i}")), 10)
        return healthy, ok

    healthy, ok = asyncio.run(go())
    assert healthy.num_free_blocks == free0 and ok[-1].finish_reason == "length"
    with pytest.raises(RuntimeError, match="failed"):  # the replica's health check
        eng.stats()


def test_shutdown_drains_running_requests(impl, engines):
    eng = engines()

    async def go():
        await collect(eng.ingest("t:dr", list(range(10, 40))))
        agen = eng.generate(PROMPT, greedy(impl, 500), "d1", session_id="t:dr")
        await agen.__anext__()
        await asyncio.to_thread(eng.shutdown)
        return await asyncio.wait_for(collect(agen), 10)

    assert asyncio.run(go())[-1].finish_reason == "abort"
    if impl.kind == "real":  # with a store: the drained session is there for the next replica
        nxt = engines()
        info = asyncio.run(nxt.get_session("t:dr"))
        assert info["num_tokens"] > 30 and info["resident"] is False


def test_a_drained_engine_is_unavailable_and_refuses_new_work_fast(impl, engines):
    """After shutdown: stats() (the health probe) raises the unavailable error naming the drain, and a
    new generate / ingest fails at its first __anext__ instead of waiting on a stopped engine."""
    eng = engines()
    eng.stats()  # healthy before
    eng.shutdown()
    with pytest.raises(EngineDrainingError, match="draining"):
        eng.stats()
    assert isinstance(EngineDrainingError(), EngineStepError)  # deploy/worker.py: UNAVAILABLE

    async def go():
        t0 = time.monotonic()
        with pytest.raises(EngineDrainingError, match="draining"):
            await asyncio.wait_for(collect(eng.generate(PROMPT, greedy(impl), "late")), 5)
        with pytest.raises(EngineDrainingError, match="draining"):
            await asyncio.wait_for(collect(eng.ingest("t:late", [1, 2, 3])), 5)
        return time.monotonic() - t0

    assert asyncio.run(go()) < 1.0  # at once, not a timeout
