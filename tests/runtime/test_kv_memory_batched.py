"""Decode of several memory sequences in one step (attention.attend_decode_tokens): block scoring batched
over the sequences (one `score_block_reprs` call per representative mode) and one decode-attention call
give each sequence exactly what its own decode gives."""

import copy

import torch
from memserve.runtime.kv_memory import KVLayerStore, KVMemoryConfig, attend_decode_tokens, default_inv_freq
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
