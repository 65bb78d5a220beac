"""Several memory sequences in one step: decode (attention.attend_decode_tokens) and prefill chunks
(attention.attend_chunks) with block scoring batched over the sequences (one `score_block_reprs` call per
representative mode) give each sequence exactly what it gets alone."""

import copy

import torch
from memserve.runtime.kv_memory import (
    KVLayerStore,
    KVMemoryConfig,
    attend_chunks,
    attend_decode_tokens,
    default_inv_freq,
)
from memserve.runtime.kv_memory import attention as kvm_attention
from memserve.scheduler.kv_policy import RetrievalPolicy

HQ, HKV, D = 6, 2, 16


def _qkv(t, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, h, D, generator=g) for h in (HQ, HKV, HKV)]


def test_batched_block_scoring_equals_per_sequence(monkeypatch):
    inv, scale = default_inv_freq(D, 10000.0), D**-0.5
    base = dict(n_init=8, n_local=64, block_size=16, compression="int4", key_group=16, value_group=16)
    policies = [RetrievalPolicy(topk=3, reselect_every=1),  # fresh selection by representatives every step
                RetrievalPolicy(topk=2, repr_mode="mean", reselect_every=3),  # another mode, reused selections
                RetrievalPolicy(topk=3, reselect_every=2, exact="query", exact_every=4),  # exact scorings between
                RetrievalPolicy(topk=3, granularity="shared", reselect_every=1)]
    lengths, steps = [400, 250, 330, 90], 12  # the last one has no blocks at first
    stores, data = [], []
    for i, (pol, n) in enumerate(zip(policies, lengths)):
        st = KVLayerStore(KVMemoryConfig(policy=pol, **base), 0, HKV, D)
        q, k, v = _qkv(n + steps, seed=i)
        st.prompt_end = n if pol.exact == "query" else None
        for p in range(0, n, 100):
            st.attend(q[p : min(n, p + 100)], k[p : min(n, p + 100)], v[p : min(n, p + 100)], p, inv, scale)
        stores.append(st)
        data.append((q, k, v))
    alone = copy.deepcopy(stores)

    calls = []
    real = kvm_attention.score_block_reprs
    monkeypatch.setattr(kvm_attention, "score_block_reprs", lambda q, r, m: calls.append(len(r)) or real(q, r, m))
    for s in range(steps):
        pos = [n + s for n in lengths]
        q = torch.stack([d[0][p] for d, p in zip(data, pos)])
        k = torch.stack([d[1][p] for d, p in zip(data, pos)])
        v = torch.stack([d[2][p] for d, p in zip(data, pos)])
        out = attend_decode_tokens(stores, q, k, v, pos, inv, scale)
        for b, st in enumerate(alone):
            ref = st.attend(q[b : b + 1], k[b : b + 1], v[b : b + 1], pos[b], inv, scale)
            torch.testing.assert_close(out[b : b + 1], ref, rtol=0, atol=0)
    assert max(calls) >= 2  # several sequences really were scored in one call
    for a, b in zip(stores, alone):
        assert a.num_blocks == b.num_blocks and a.num_blocks > 0
        for name in ("wkeys", "wv", "wscore", "reprs", "sel_count"):
            torch.testing.assert_close(getattr(a, name).get(), getattr(b, name).get(), rtol=0, atol=0)
        assert torch.equal(a.dec_slots, b.dec_slots)


def test_batched_prefill_chunks_equal_per_sequence(monkeypatch):
    """Chunks of 4 sequences attended round by round (ragged chunk sizes, a one-token piece, one sequence
    ending early, exact scoring at one prompt's end) == each sequence's chunks alone, bit for bit."""
    inv, scale = default_inv_freq(D, 10000.0), D**-0.5
    base = dict(n_init=8, n_local=64, block_size=16, compression="int4", key_group=16, value_group=16)
    policies = [RetrievalPolicy(topk=3), RetrievalPolicy(topk=2, repr_mode="mean"),
                RetrievalPolicy(topk=3, exact="query"), RetrievalPolicy(topk=3, granularity="q_head")]
    chunks = [[100, 100, 100, 50], [90, 90, 1, 60], [120, 120, 80], [70, 70, 70, 70, 40]]
    stores = [KVLayerStore(KVMemoryConfig(policy=pol, **base), 0, HKV, D) for pol in policies]
    stores[2].prompt_end = sum(chunks[2])
    alone = copy.deepcopy(stores)
    data = [_qkv(sum(c), seed=10 + i) for i, c in enumerate(chunks)]
    starts = [[sum(c[:j]) for j in range(len(c))] for c in chunks]

    calls = []
    real = kvm_attention.score_block_reprs
    monkeypatch.setattr(kvm_attention, "score_block_reprs", lambda q, r, m: calls.append(len(r)) or real(q, r, m))
    for r in range(max(map(len, chunks))):
        rows = [b for b in range(len(stores)) if r < len(chunks[b])]
        sl = [slice(starts[b][r], starts[b][r] + chunks[b][r]) for b in rows]
        outs = attend_chunks([stores[b] for b in rows], *([data[b][i][s] for b, s in zip(rows, sl)] for i in range(3)),
                             [starts[b][r] for b in rows], inv, scale)
        for b, s, o in zip(rows, sl, outs):
            ref = alone[b].attend(data[b][0][s], data[b][1][s], data[b][2][s], starts[b][r], inv, scale)
            torch.testing.assert_close(o, ref, rtol=0, atol=0)
    assert max(calls) >= 2
    for a, b in zip(stores, alone):
        assert a.num_blocks == b.num_blocks > 0
        for name in ("wkeys", "wv", "wscore", "reprs", "sel_count"):
            torch.testing.assert_close(getattr(a, name).get(), getattr(b, name).get(), rtol=0, atol=0)
