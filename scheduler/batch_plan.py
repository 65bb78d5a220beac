"""Continuous-batching policy: which sequences run this step, and how many tokens each.

Pure CPU logic (no tensors, no model), in the style of vLLM v1's scheduler: a sequence carries two
counters instead of a prefill/decode phase,

* `num_tokens`           tokens known (prompt + generated so far),
* `num_computed_tokens`  tokens whose KV is in the cache,

and each step gives every scheduled sequence `num_new_tokens` = min(num_tokens - num_computed_tokens,
remaining token budget). A long prompt therefore runs in chunks over several steps (chunked
prefill), a decoding sequence asks for exactly one token, and both share one flattened batch. A
sequence is sampled when its step reaches `num_tokens` (its last prompt chunk, or a decode step).

Order of a step (`Scheduler.schedule`):
1. running sequences, oldest first, each allocating the KV blocks its new tokens need; when the pool
   is short of bytes, newer running sequences are preempted by bytes (`_victim`: the newest one whose
   pool bytes cover the shortfall, else the newest holding any; blocks freed, `num_computed_tokens`
   reset to 0, put back at the head of the waiting queue: recompute preemption — its generated tokens
   are kept and re-prefilled later, so greedy outputs do not change);
2. if nothing was preempted, waiting sequences (FIFO) are admitted while the token budget, the
   `max_num_seqs` bound and the free blocks allow.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from memserve.scheduler.block_allocator import BlockAllocator


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"   # waiting again, after losing its blocks
    FINISHED = "finished"


class Sequence:
    """Scheduling state of one request. `token_ids` = prompt + generated tokens."""

    __slots__ = ("seq_id", "token_ids", "num_prompt_tokens", "num_computed_tokens", "status",
                 "num_preemptions")

    def __init__(self, seq_id: str, prompt_token_ids: list[int]):
        assert len(prompt_token_ids) > 0, "empty prompt"
        self.seq_id = seq_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.status = SeqStatus.WAITING
        self.num_preemptions = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id!r}, computed={self.num_computed_tokens}/{self.num_tokens}, "
                f"{self.status.value})")


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048   # token budget of one step (prefill chunk size bound)

    def __post_init__(self):
        assert self.max_num_seqs >= 1, "max_num_seqs must be >= 1"
        assert self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1"


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    # tokens [start, start + num_new_tokens) of seq.token_ids run this step
    start: int
    # this step reaches the end of the known tokens, so the model's last logits get sampled
    sample: bool


@dataclass(slots=True)
class BatchPlan:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator):
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []     # admission order: oldest first, newest last
        self.num_preemptions_total = 0

    # -- queue management ------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished or aborted) wherever it is and free its blocks."""
        if seq.status in (SeqStatus.RUNNING,):
            self.running.remove(seq)
        elif seq.status in (SeqStatus.WAITING, SeqStatus.PREEMPTED):
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.allocator.free(seq.seq_id)
        seq.status = SeqStatus.FINISHED

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the policy ------------------------------------------------------------------------
    def _preempt(self, victim: Sequence, plan: BatchPlan) -> None:
        self.allocator.free(victim.seq_id)
        victim.num_computed_tokens = 0
        victim.status = SeqStatus.PREEMPTED
        victim.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(victim)
        plan.preempted.append(victim)

    def _victim(self, i: int, short_bytes: int) -> Sequence:
        """Byte-based choice among the running sequences newer than i (never one already scheduled): the
        newest whose paged-pool bytes cover `short_bytes` (one preemption instead of several newer, smaller
        ones), else the newest holding any pool bytes. One that holds none (a KV-memory sequence: its bytes
        are in the memory tier) would free nothing the pool needs and lose its memory."""
        held = [(j, self.allocator.paged_bytes_of(self.running[j].seq_id)) for j in range(len(self.running) - 1, i, -1)]
        held = [(j, b) for j, b in held if b > 0]
        for j, b in held:
            if b >= short_bytes:
                return self.running.pop(j)
        if held:
            return self.running.pop(held[0][0])
        return self.running.pop(i)  # the sequence that needs the bytes preempts itself

    def schedule(self) -> BatchPlan:
        plan = BatchPlan()
        budget = self.config.max_num_batched_tokens
        alloc = self.allocator

        # 1. running sequences, oldest first; preempt the newest when blocks run out
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            assert num_new > 0, f"{seq} has nothing to compute"
            target = seq.num_computed_tokens + num_new
            while not alloc.can_allocate(seq.seq_id, target):
                victim = self._victim(i, alloc.bytes_short(seq.seq_id, target))
                self._preempt(victim, plan)
                if victim is seq:
                    break
            else:
                alloc.allocate(seq.seq_id, target)
                plan.scheduled.append(ScheduledSeq(seq, num_new, seq.num_computed_tokens, target == seq.num_tokens))
                budget -= num_new
                i += 1
                continue
            break  # seq itself was preempted: everything after it already was too

        # 2. admit waiting sequences (not in a step that had to preempt: the pool is full)
        if not plan.preempted:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                seq = self.waiting[0]
                num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
                target = seq.num_computed_tokens + num_new
                if not alloc.can_allocate(seq.seq_id, target):
                    break
                self.waiting.popleft()
                alloc.allocate(seq.seq_id, target)
                seq.status = SeqStatus.RUNNING
                self.running.append(seq)
                plan.scheduled.append(ScheduledSeq(seq, num_new, seq.num_computed_tokens, target == seq.num_tokens))
                budget -= num_new
        return plan

    def update_from_output(self, plan: BatchPlan, sampled: dict[str, int]) -> None:
        """Advance the counters of a finished step; `sampled` maps seq_id -> new token for the
        sequences whose step had `sample=True`."""
        for s in plan.scheduled:
            seq = s.seq
            if seq.status is not SeqStatus.RUNNING:   # aborted while the step ran
                continue
            seq.num_computed_tokens += s.num_new_tokens
            if s.sample:
                seq.token_ids.append(sampled[seq.seq_id])
