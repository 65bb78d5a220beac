"""The batching policy alone: no model, fake sampled tokens."""

import random

import pytest
from memserve.scheduler.batch_plan import Scheduler, SchedulerConfig, SeqStatus, Sequence
from memserve.scheduler.block_allocator import BlockAllocator


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=32):
    alloc = BlockAllocator(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget), alloc), alloc


def run_step(sched, token=7):
    plan = sched.schedule()
    sampled = {s.seq.seq_id: token for s in plan.scheduled if s.sample}
    sched.update_from_output(plan, sampled)
    return plan


def check_invariants(sched, alloc):
    used = sum(len(t) for t in alloc.tables.values())
    assert used + alloc.num_free_blocks == alloc.num_blocks
    all_blocks = [b for t in alloc.tables.values() for b in t]
    assert len(set(all_blocks)) == len(all_blocks), "a block is owned twice"
    for seq in sched.running:
        assert alloc.num_blocks_of(seq.seq_id) * alloc.block_size >= seq.num_computed_tokens
    for seq in sched.waiting:
        assert alloc.num_blocks_of(seq.seq_id) == 0 or seq.num_computed_tokens > 0


def test_long_prompt_is_chunked_and_sampled_only_at_the_end():
    sched, alloc = make(budget=32)
    seq = Sequence("a", list(range(100)))
    sched.add(seq)
    sizes, samples = [], []
    for _ in range(4):
        plan = run_step(sched)
        (s,) = plan.scheduled
        sizes.append(s.num_new_tokens)
        samples.append(s.sample)
    assert sizes == [32, 32, 32, 4]
    assert samples == [False, False, False, True]
    assert seq.num_computed_tokens == 100 and seq.num_tokens == 101
    plan = run_step(sched)  # decode: one token
    assert [s.num_new_tokens for s in plan.scheduled] == [1] and plan.scheduled[0].sample


def test_decodes_first_then_prefill_fills_the_budget():
    sched, alloc = make(budget=16)
    a = Sequence("a", [1] * 10)
    sched.add(a)
    run_step(sched)  # a prefilled (10 tokens)
    b = Sequence("b", [2] * 40)
    sched.add(b)
    plan = run_step(sched)
    assert [(s.seq.seq_id, s.num_new_tokens) for s in plan.scheduled] == [("a", 1), ("b", 15)]
    assert plan.num_batched_tokens == 16


def test_max_num_seqs_bounds_the_running_set():
    sched, alloc = make(max_num_seqs=2, budget=100)
    for i in range(4):
        sched.add(Sequence(str(i), [i] * 5))
    plan = run_step(sched)
    assert [s.seq.seq_id for s in plan.scheduled] == ["0", "1"]
    assert len(sched.waiting) == 2


def test_admission_waits_for_free_blocks():
    sched, alloc = make(num_blocks=4, block_size=4, budget=100)
    sched.add(Sequence("a", [1] * 12))   # 3 blocks
    sched.add(Sequence("b", [1] * 8))    # 2 blocks: does not fit next to a
    plan = run_step(sched)
    assert [s.seq.seq_id for s in plan.scheduled] == ["a"]
    assert [s.seq_id for s in sched.waiting] == ["b"]
    sched.finish(sched.running[0])
    assert alloc.num_free_blocks == 4
    plan = run_step(sched)
    assert [s.seq.seq_id for s in plan.scheduled] == ["b"]


def test_preemption_is_newest_first_and_recomputes_everything():
    # 6 blocks of 4 tokens; three sequences of 7 tokens take 2 blocks each; growth forces preemption
    sched, alloc = make(num_blocks=6, block_size=4, budget=64)
    seqs = [Sequence(n, [1] * 7) for n in "abc"]
    for s in seqs:
        sched.add(s)
    run_step(sched)                    # all prefilled: 7 computed (2 blocks each), 1 token sampled
    assert alloc.num_free_blocks == 0
    plan = run_step(sched)             # token 8 still fits in 2 blocks
    assert not plan.preempted
    plan = run_step(sched)             # a needs a 3rd block -> c (newest) is preempted
    assert [s.seq_id for s in plan.preempted] == ["c"]
    c = seqs[2]
    assert c.status is SeqStatus.PREEMPTED and c.num_computed_tokens == 0 and alloc.num_blocks_of("c") == 0
    assert c.num_tokens == 9 and c.num_output_tokens == 2  # generated tokens kept
    assert sched.waiting[0] is c
    # when room returns, c re-prefills prompt + its generated token in one go
    sched.finish(seqs[0])
    sched.finish(seqs[1])
    plan = run_step(sched)
    (s,) = plan.scheduled
    assert s.seq is c and s.start == 0 and s.num_new_tokens == 9 and s.sample


def test_a_sequence_preempts_itself_when_alone_it_does_not_fit():
    sched, alloc = make(num_blocks=2, block_size=4, budget=64)
    a, b = Sequence("a", [1] * 4), Sequence("b", [1] * 3)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a: 4 computed -> 1 block, b: 3 computed -> 1 block; pool full
    plan = run_step(sched)  # a needs a 2nd block: b preempted; then a runs
    assert [s.seq_id for s in plan.preempted] == ["b"]
    assert [s.seq.seq_id for s in plan.scheduled] == ["a"]


def test_preemption_skips_sequences_that_hold_no_pool_blocks():
    # a KV-memory sequence keeps its KV outside the paged pool: preempting it would free nothing and
    # throw its memory away, so the newest sequence that does hold blocks goes instead
    from memserve.scheduler.block_allocator import MemoryAwareAllocator

    alloc = MemoryAwareAllocator(3, 4)  # block 0 is the memory sequences' scratch: 2 pool blocks
    alloc.memory_seqs.add("m")
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), alloc)
    for seq in (Sequence("a", [1] * 4), Sequence("b", [1] * 3), Sequence("m", [1] * 5)):
        sched.add(seq)
    run_step(sched)  # a and b take one pool block each; m none
    assert alloc.num_free_blocks == 0 and alloc.num_blocks_of("m") == 0
    plan = run_step(sched)  # a needs a 2nd block
    assert [s.seq_id for s in plan.preempted] == ["b"]
    assert [s.seq.seq_id for s in plan.scheduled] == ["a", "m"]


def test_finish_of_waiting_and_running_frees_blocks():
    sched, alloc = make(num_blocks=8, block_size=4, budget=64)
    a, b = Sequence("a", [1] * 9), Sequence("b", [1] * 5)
    sched.add(a)
    run_step(sched)
    sched.add(b)
    sched.finish(b)  # aborted while waiting
    sched.finish(a)  # aborted while running
    assert alloc.num_free_blocks == 8 and not sched.has_unfinished()
    assert a.status is SeqStatus.FINISHED


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_keeps_invariants_and_finishes(seed):
    rng = random.Random(seed)
    sched, alloc = make(num_blocks=24, block_size=4, max_num_seqs=6, budget=rng.choice([8, 16, 40]))
    targets = {}
    for i in range(12):
        seq = Sequence(str(i), [i] * rng.randint(1, 30))
        targets[seq.seq_id] = rng.randint(1, 20)
        sched.add(seq)
    preempted = 0
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        plan = run_step(sched)
        preempted += len(plan.preempted)
        for s in plan.scheduled:
            seq = s.seq
            if seq.status is SeqStatus.RUNNING and seq.num_output_tokens >= targets[seq.seq_id]:
                sched.finish(seq)
        check_invariants(sched, alloc)
    assert not sched.has_unfinished()
    assert alloc.num_free_blocks == alloc.num_blocks


def test_preemption_is_by_bytes_one_victim_that_covers_the_shortfall():
    """A sequence short of 2 blocks' bytes: the newest running sequence holds 1 block, an older one 3. By
    bytes, the one whose pool bytes cover the shortfall goes (one preemption); newest-first by blocks would
    have preempted both."""
    sched, alloc = make(num_blocks=8, block_size=4, budget=24)
    alloc.block_bytes = 1000
    a, b, c = Sequence("a", [1] * 24), Sequence("b", [1] * 13), Sequence("c", [1] * 5)
    for seq, computed in ((a, 4), (b, 12), (c, 4)):
        seq.num_computed_tokens = computed
        seq.status = SeqStatus.RUNNING
        alloc.allocate(seq.seq_id, computed)
        sched.running.append(seq)
    assert alloc.num_free_blocks == 3 and alloc.bytes_short("a", 24) == 2000
    assert alloc.paged_bytes_of("b") == 3000 and alloc.paged_bytes_of("c") == 1000
    plan = sched.schedule()
    assert [s.seq_id for s in plan.preempted] == ["b"]
    assert [s.seq.seq_id for s in plan.scheduled] == ["a", "c"]
