"""Replica-wide memory-tier budget (runtime/kv_memory/budget.py) and honest admission, tiny model."""

import pytest
import torch
from memserve.runtime.engine import LLMEngine
from memserve.runtime.errors import MemoryTierFullError
from memserve.runtime.kv_memory.budget import TierBudget
from memserve.runtime.sampling import SamplingParams
from memserve.scheduler.block_allocator import MemoryAwareAllocator

SMALL = {"n_init": 4, "n_local": 32, "block_size": 8, "repr_topk": 2, "chunk_size": 24, "key_group": 8,
         "value_group": 8, "compression": "int8"}


def _prompt(n, seed):
    return torch.randint(5, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(path, **kw):
    return LLMEngine(str(path), progress=False, kv_memory="retrieval", kv_memory_config=SMALL, **kw)


def _watch(eng, monkeypatch):
    """Record the exact tier bytes after every pack that charged the budget."""
    peaks, charge = [], TierBudget.charge

    def watched(self, store, nbytes):
        charge(self, store, nbytes)
        peaks.append(sum(m.tier_bytes()["memory"] for m in {id(m): m for m in eng.memory.all_memories()}.values()))

    monkeypatch.setattr(TierBudget, "charge", watched)
    return peaks


def _drain(eng):
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
    return outs


def test_managers_built_once_and_dense_path_unchanged(tiny_llama_dir):
    eng = _engine(tiny_llama_dir)
    assert isinstance(eng.allocator, MemoryAwareAllocator) and eng.scheduler.allocator is eng.allocator
    assert eng.max_model_len <= (eng.allocator.num_blocks - 1) * eng.allocator.block_size


def test_allocator_counts_pool_bytes_and_memory_sequences_hold_none(tiny_llama_dir):
    """The scheduler's byte currency for preemption: a dense sequence's paged-pool bytes (blocks x bytes per
    block over all layers); a memory sequence holds none (its KV is in the memory tier, which its budget
    governs), so preempting it would free nothing for the pool."""
    eng = _engine(tiny_llama_dir, max_num_batched_tokens=512)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    eng.add_request("dense", _prompt(40, 1), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True,
                                                            kv_memory="off"))
    eng.add_request("mem", _prompt(200, 2), params)
    eng.step()
    alloc, c = eng.allocator, eng.config
    per_block = 2 * c.num_hidden_layers * alloc.block_size * c.num_key_value_heads * c.head_dim * 4  # fp32 K + V
    assert alloc.block_bytes == per_block
    assert alloc.paged_bytes_of("dense") == alloc.num_blocks_of("dense") * per_block > 0
    assert alloc.paged_bytes_of("mem") == 0 and alloc.num_blocks_of("mem") == 0
    assert eng.memory.backend.memories["mem"].tier_bytes()["memory"] > 0
    _drain(eng)


def test_budget_never_exceeded_under_many_concurrent_long_sequences(tiny_llama_dir, monkeypatch):
    limit = 60_000  # bytes, over all sequences: ~1/6 of what 8 x 400-token memories would hold
    eng = _engine(tiny_llama_dir, kv_memory_tier_bytes=limit, max_num_seqs=8, max_num_batched_tokens=256)
    peaks = _watch(eng, monkeypatch)
    for i in range(8):
        eng.add_request(f"r{i}", _prompt(400, i), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    outs = _drain(eng)
    assert len(outs) == 8 and all(len(o.token_ids) == 4 for o in outs.values())
    assert peaks and max(peaks) <= limit  # after every pack, not only at step ends
    assert eng.memory.tier.evicted_blocks > 0  # the limit was reached and blocks were evicted by policy
    # unbounded, the same load holds far more: the budget, not the load, kept it down
    free = _engine(tiny_llama_dir, max_num_seqs=8, max_num_batched_tokens=256)
    for i in range(8):
        free.add_request(f"r{i}", _prompt(400, i), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    seen = []
    while free.has_unfinished():
        free.step()
        seen.append(free.stats().kv_memory_bytes["memory"])
    assert max(seen) > 3 * limit


def test_idle_sessions_are_parked_through_the_hook_at_the_limit(tiny_llama_dir, monkeypatch):
    limit = 30_000
    eng = _engine(tiny_llama_dir, kv_memory_tier_bytes=limit)
    for sid in ("a", "b"):
        list(eng.memory.ingest(sid, _prompt(300, ord(sid))))
    parked = []

    def park(session_id):  # what a durable session store does: snapshot, then drop from memory
        parked.append((session_id, eng.memory.sessions.get(session_id).memory.num_tokens))
        eng.memory.sessions.delete(session_id)
        return True

    eng.memory.park_session = park
    peaks = _watch(eng, monkeypatch)
    eng.add_request("long", _prompt(400, 7), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    _drain(eng)
    assert parked and parked[0][0] == "a"  # least recently used first
    assert max(peaks) <= limit


def test_refuse_policy_refuses_what_cannot_fit_and_holds_back_what_cannot_fit_now(tiny_llama_dir):
    eng = _engine(tiny_llama_dir, kv_memory_tier_bytes=20_000, kv_memory_tier_policy="refuse")
    with pytest.raises(MemoryTierFullError, match="kv_memory_tier_bytes"):
        eng.add_request("huge", _prompt(2000, 1), SamplingParams(max_tokens=4))
    assert not eng.has_unfinished()
    per_tok = eng.memory.tier_bytes_per_token(eng.memory.cfg)
    n = int(0.7 * 20_000 / per_tok)  # each fits alone, two together do not
    for i in range(2):
        eng.add_request(f"r{i}", _prompt(n - 8, i), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    eng.step()
    assert eng.memory.uses_memory("r0") and "r0" in eng.memory.backend.memories
    assert "r1" not in eng.memory.backend.memories  # held back by the allocator: no room in the tier yet
    outs = _drain(eng)
    assert set(outs) == {"r0", "r1"}  # r1 ran once r0 finished and freed its memory
    assert eng.memory.tier.sync() == 0
