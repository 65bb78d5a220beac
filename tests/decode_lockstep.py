"""Lockstep comparisons of the native (C++) decode steps with their references, shared by
tests/kernels/test_cpu_decode*.py: every decode step of a greedy generation runs both ways from the same
cache state, generation continues with the reference's logits (both see the same history), and the largest
logit / cache-write differences (relative to the reference's largest magnitude) are collected, with the
memory-layer lookups each native step made (`reads`; a dense model makes none)."""

from __future__ import annotations

import torch
from memserve.runtime import SamplingParams
from memserve.runtime.attention import AttentionMetadata


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _lookups(eng) -> int:
    stats = getattr(eng.model, "lookup_stats", None)
    return stats.lookups_total if stats is not None else 0


def single_lockstep(llm, prompt, n):
    """n greedy tokens of one prompt; each decode step through the eager `decode_one` (reference) and the
    single-token native step. -> {"logits", "kv", "steps", "reads"}."""
    eng = llm.engine
    ds = eng.decode_step
    assert ds.path == "native"
    native, ds.native = ds.native, None  # ds runs decode_one (eager) below
    worst = {"logits": 0.0, "kv": 0.0, "steps": 0, "reads": set()}

    def both(token, pos, slot, start, end):
        before = ds.flat.clone()
        ref = ds(token, pos, slot, start, end)
        ref_kv = ds.flat.clone()
        ds.flat.copy_(before)
        n0 = _lookups(eng)
        with torch.inference_mode():
            got = native.step(token, pos, ds.cos_t, ds.sin_t, ds.flat, start, end, slot)
        worst["reads"].add(_lookups(eng) - n0)
        worst["logits"] = max(worst["logits"], _rel(got, ref))
        worst["kv"] = max(worst["kv"], _rel(ds.flat, ref_kv))
        worst["steps"] += 1
        return ref

    eng.decode_step = both
    llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
    return worst


def batched_lockstep(llm, prompts, max_tokens):
    """Greedy generations of `prompts` (max_tokens[i] tokens each); every batched decode step through the
    native batched step and Model.forward (reference). -> ({"logits", "kv", "batches", "reads"}, outputs)."""
    eng = llm.engine
    native = eng._decode_batch
    worst = {"logits": 0.0, "kv": 0.0, "batches": [], "reads": set()}

    def both(plan, ids):
        flat = eng.decode_step.flat
        before = flat.clone()
        n0 = _lookups(eng)
        got = native(plan, ids)
        assert got is not None
        worst["reads"].add(_lookups(eng) - n0)
        got_kv = flat.clone()
        flat.copy_(before)
        meta = AttentionMetadata.build(
            [s.seq.seq_id for s in plan.scheduled], [1] * len(ids), [s.start for s in plan.scheduled],
            [eng.allocator.tables[s.seq.seq_id] for s in plan.scheduled], eng.allocator.block_size)
        ref = eng.model.forward(torch.tensor(ids), meta, eng.attn, torch.arange(len(ids)))
        worst["logits"] = max(worst["logits"], _rel(got, ref))
        worst["kv"] = max(worst["kv"], _rel(got_kv, flat))
        worst["batches"].append(len(ids))
        return ref

    eng._decode_batch = both
    sps = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in max_tokens]
    return worst, llm.generate(prompts, sps, use_tqdm=False)
