"""Durable sessions in the engine (tiny random-weight Llama): snapshots after each request, loading on a
replica that does not hold the session, restart listing, damage -> DataLossError with the engine serving
on, parking under a RAM budget, drain; and the async engine's fault handling (a failing forward)."""

import asyncio

import pytest
import torch
from memserve.runtime.async_engine import UNHEALTHY_AFTER, AsyncLLMEngine
from memserve.runtime.engine import LLMEngine
from memserve.runtime.errors import DataLossError, EngineStepError, SessionNotFoundError
from memserve.runtime.sampling import SamplingParams
from memserve.runtime.session_store import open_session_store
from memserve.runtime.sessions import torch_equal_sessions
from tiny_models import fail_next_forwards

CFG = {"n_init": 4, "n_local": 32, "block_size": 8, "repr_topk": 2, "chunk_size": 24, "key_group": 8,
       "value_group": 8, "topk": 10_000, "compression": "none"}


def _engine(path, store=None, **kw):
    return LLMEngine(str(path), progress=False, kv_memory="retrieval", kv_memory_config=CFG, session_store=store, **kw)


def _greedy(n=5):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _run(eng, prompt, session_id=None, rid="r", n=5):
    eng.add_request(rid, prompt, _greedy(n), session_id=session_id)
    out = None
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == rid:
                out = o
    return out.token_ids


def _prompt(n, seed=0):
    return torch.randint(5, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _ingest(eng, sid, doc):
    for _ in eng.ingest(sid, doc):
        pass


def test_another_replica_continues_from_the_store(tiny_llama_dir, tmp_path):
    store = str(tmp_path / "store")
    doc, q1, q2 = _prompt(120, 1), _prompt(6, 2), _prompt(6, 3)
    a = _engine(tiny_llama_dir, store)
    _ingest(a, "acme:doc", doc)
    _run(a, q1, "acme:doc", "a1")
    # a fresh engine (a restarted replica / another replica) lists and serves the session from the store
    b = _engine(tiny_llama_dir, store)
    listed = {s["session_id"]: s for s in b.list_sessions()}
    assert set(listed) == {"acme:doc"} and not listed["acme:doc"]["resident"]
    assert listed["acme:doc"]["num_tokens"] == a.get_session("acme:doc")["num_tokens"]
    assert b.get_session("acme:doc")["num_computed_tokens"] == a.get_session("acme:doc")["num_computed_tokens"]
    got = _run(b, q2, "acme:doc", "b1")
    assert b.resident_sessions() == ["acme:doc"]
    # reference: a store-less engine that saw the whole conversation: same tokens, bit-exact same memory
    ref = _engine(tiny_llama_dir)
    _ingest(ref, "s", doc)
    _run(ref, q1, "s", "x1")
    assert _run(ref, q2, "s", "x2") == got
    ref.memory.sessions.get("s").session_id = "acme:doc"
    assert torch_equal_sessions(ref.memory.sessions.get("s"), b.memory.sessions.get("acme:doc"))


def test_stale_ram_copy_is_reloaded(tiny_llama_dir, tmp_path):
    store = str(tmp_path / "store")
    doc, q1, q2 = _prompt(80, 4), _prompt(5, 5), _prompt(5, 6)
    a, b = _engine(tiny_llama_dir, store), _engine(tiny_llama_dir, store)
    _ingest(a, "t:s", doc)
    _run(b, q1, "t:s", "b1")  # b loads and advances the session; a's RAM copy is now stale
    got = _run(a, q2, "t:s", "a1")  # a notices the newer stored version and continues from it
    ref = _engine(tiny_llama_dir)
    _ingest(ref, "s", doc)
    _run(ref, q1, "s", "x1")
    assert _run(ref, q2, "s", "x2") == got


@pytest.mark.parametrize("damage", ["truncate", "flip", "version"])
def test_damaged_snapshot_is_data_loss_and_engine_serves_on(tiny_llama_dir, tmp_path, damage):
    store = str(tmp_path / "store")
    a = _engine(tiny_llama_dir, store)
    _ingest(a, "acme:doc", _prompt(60, 7))
    key = open_session_store(store)._key("acme:doc")
    blob = open(key, "rb").read()
    blob = {"truncate": blob[:len(blob) // 2], "flip": blob[:-3] + bytes([blob[-3] ^ 0x40]) + blob[-2:],
            "version": blob.replace(b"memserve.snapshot.v1", b"memserve.snapshot.v9")}[damage]
    open(key, "wb").write(blob)
    b = _engine(tiny_llama_dir, store)
    free0 = b.allocator.num_free_blocks
    with pytest.raises(DataLossError):
        b.add_request("r", _prompt(4, 8), _greedy(), session_id="acme:doc")
    assert not b.requests and b.allocator.num_free_blocks == free0 and "acme:doc" not in b.memory.sessions
    assert len(_run(b, _prompt(10, 9), rid="ok")) == 5  # still serving
    assert len(_run(b, _prompt(10, 9), "acme:other", "ok2")) == 5


def test_the_tier_budget_parks_through_the_store(tiny_llama_dir, tmp_path):
    # one parking path: kv_memory/budget.py at kv_memory_tier_bytes calls the manager's park_session hook,
    # which with a store is DurableSessions.park_one (snapshot if needed, then free from RAM).
    # A 100-token session holds 49,152 memory-tier bytes here: one fits in 70,000, two do not.
    store = str(tmp_path / "store")
    doc_a, doc_b, q = _prompt(100, 10), _prompt(100, 12), _prompt(5, 11)
    eng = _engine(tiny_llama_dir, store, kv_memory_tier_bytes=70_000)
    assert eng.memory.park_session == eng.memory.durable.park_one
    _ingest(eng, "a:s1", doc_a)
    _ingest(eng, "a:s2", doc_b)  # over the budget: s1 (least recently used, idle) is parked, not evicted
    assert eng.resident_sessions() == ["a:s2"] and eng.memory.durable.parked_total == 1
    assert eng.memory.tier.evicted_blocks == 0
    assert eng.stats().kv_memory_bytes["memory"] <= 70_000
    info = eng.get_session("a:s1")
    assert not info["resident"] and info["num_computed_tokens"] == len(doc_a)
    ref = _engine(tiny_llama_dir)  # no store, no budget
    _ingest(ref, "s", doc_a)
    assert _run(eng, q, "a:s1") == _run(ref, q, "s")  # unparked from the store (s2 parked): same answer
    assert eng.resident_sessions() == ["a:s1"] and eng.memory.durable.parked_total == 2


def test_parking_never_drops_a_session_without_a_snapshot(tiny_llama_dir, tmp_path, monkeypatch):
    store = str(tmp_path / "store")
    eng = _engine(tiny_llama_dir, store, kv_memory_tier_bytes=70_000)
    _ingest(eng, "a:s1", _prompt(100, 10))

    def broken(*a, **k):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(eng.memory.durable.store, "put", broken)
    eng.memory.sessions.get("a:s1").version += 1  # its latest state is not in the store any more
    _ingest(eng, "a:s2", _prompt(100, 12))  # over the budget, but s1 cannot be snapshotted: it stays
    assert sorted(eng.resident_sessions()) == ["a:s1", "a:s2"] and eng.memory.durable.parked_total == 0
    assert eng.memory.durable.persist_errors >= 2
    assert eng.memory.tier.evicted_blocks > 0  # the budget held by evicting blocks instead
    assert eng.stats().kv_memory_bytes["memory"] <= 70_000


def test_delete_removes_ram_and_store(tiny_llama_dir, tmp_path):
    store = str(tmp_path / "store")
    eng = _engine(tiny_llama_dir, store)
    _ingest(eng, "a:s", _prompt(40, 12))
    assert open_session_store(store).list() == ["a:s"]
    eng.delete_session("a:s")
    assert open_session_store(store).list() == []
    with pytest.raises(SessionNotFoundError):
        eng.get_session("a:s")
    with pytest.raises(SessionNotFoundError):
        _engine(tiny_llama_dir, store).delete_session("a:s")


def test_async_drain_snapshots_a_running_session(tiny_llama_dir, tmp_path):
    store = str(tmp_path / "store")
    aeng = AsyncLLMEngine(engine=_engine(tiny_llama_dir, store))
    doc = _prompt(60, 13)

    async def go():
        [p async for p in aeng.ingest("a:s", doc, poll_s=0.01)]
        before = (await aeng.get_session("a:s"))["num_computed_tokens"]
        gen = aeng.generate(_prompt(4, 14), SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True),
                            "long", session_id="a:s")
        await gen.__anext__()
        await gen.__anext__()
        await asyncio.to_thread(aeng.shutdown)  # the drain: aborts it, snapshots what it computed
        outs = [o async for o in gen]
        return before, outs[-1]

    before, last = asyncio.run(go())
    assert last.finish_reason == "abort"
    after = _engine(tiny_llama_dir, store).get_session("a:s")
    assert after["num_computed_tokens"] > before


class _Boom(Exception):
    pass


def test_forward_exception_fails_only_that_step_and_frees_blocks(tiny_llama_dir):
    eng = LLMEngine(str(tiny_llama_dir), progress=False, kv_memory="off", max_num_seqs=1)
    aeng = AsyncLLMEngine(engine=eng)
    free0 = eng.allocator.num_free_blocks
    fail = fail_next_forwards(eng, lambda: _Boom("injected"))

    async def one(rid, prompt, n=4):
        return [o async for o in aeng.generate(prompt, _greedy(n), rid)][-1]

    async def go():
        ok_ref = await one("ref", _prompt(8, 21))
        # max_num_seqs=1: "a" runs, "b" waits; the failing step is a's only. "a" asks for far more tokens
        # than it can make before the failure is armed: with the native decode step 50 tokens of the tiny
        # model took < 0.1 s, so "a" had finished and the injected failure hit "b" (a clean-clone CI run)
        ta = asyncio.ensure_future(one("a", _prompt(8, 20), 10_000))
        await asyncio.sleep(0.05)
        tb = asyncio.ensure_future(one("b", _prompt(8, 21)))
        await asyncio.sleep(0.05)
        fail["n"] = 1
        res = await asyncio.gather(ta, tb, return_exceptions=True)
        healthy = aeng.stats()
        fail["n"] = UNHEALTHY_AFTER  # repeated failures: unhealthy
        rep = await asyncio.gather(*(one(f"c{i}", _prompt(8, 22 + i)) for i in range(UNHEALTHY_AFTER)),
                                   return_exceptions=True)
        return ok_ref, res, healthy, rep

    try:
        ok_ref, (ra, rb), healthy, rep = asyncio.run(go())
        assert isinstance(ra, EngineStepError) and "injected" in str(ra)
        assert not isinstance(rb, BaseException) and rb.token_ids == ok_ref.token_ids  # b unaffected
        assert healthy.num_free_blocks == free0 and not eng.requests
        assert all(isinstance(r, EngineStepError) for r in rep)
        with pytest.raises(RuntimeError, match="failed"):
            aeng.stats()
        assert eng.allocator.num_free_blocks == free0
    finally:
        aeng.shutdown()


def test_request_preempted_then_finished_keeps_the_session_snapshot(tiny_llama_dir, tmp_path):
    """A session request that loses its memory (preempted: recompute from 0) and ends before recomputing
    must leave the session as its last snapshot -- not an empty session (found by the faults work)."""
    store = str(tmp_path / "store")
    eng = _engine(tiny_llama_dir, store)
    doc = _prompt(120, 4)
    _ingest(eng, "t:s", doc)
    before = eng.get_session("t:s")["num_tokens"]
    eng.add_request("r2", _prompt(40, 5), _greedy(50), session_id="t:s")
    eng.step()
    req = eng.requests["r2"]
    req.seq.num_computed_tokens = 0  # what a recompute preemption leaves, the memory no longer matching
    eng.abort_request("r2")
    while eng.has_unfinished():
        eng.step()
    assert eng.get_session("t:s")["num_tokens"] == before > 0
    ref = _engine(tiny_llama_dir)
    _ingest(ref, "t:s", doc)
    q = _prompt(6, 6)
    assert _run(eng, q, "t:s", "r3") == _run(ref, q, "t:s", "x3")
