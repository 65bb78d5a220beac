"""RetrievalPolicy(unselected="centroid"): unselected blocks attended as one mean-key / mean-value column
each (logit + log(block_size)), checked against a float64 formula written from the definition."""

import math

import pytest
import torch
from kv_memory_testlib import HKV, HQ, D, attend_in_chunks
from kv_memory_testlib import random_qkv as _qkv
from memserve.runtime.kv_memory import (
    KVLayerStore,
    KVMemoryConfig,
    default_inv_freq,
    reference_attention,
    rotate,
)
from memserve.scheduler.kv_policy import RetrievalPolicy


def _centroid_reference(q, k, v, p, n_blocks, inv, scale, n_init, n_local, bs):
    """Query at position p (engaged), every earlier key: sinks [0, n_init) and the window
    [n_init + n_blocks * bs, p] exactly (far keys at distance n_local, local ones at their true distance),
    and each block b of [n_init + b * bs, n_init + (b + 1) * bs) as ONE column: logit = scale * q_nlocal .
    mean(k_b) + log(bs), value mean(v_b). float64, from the definition (no memory internals)."""
    g = HQ // HKV
    qp = q[p : p + 1].double()
    ql = rotate(qp, torch.tensor([p]), inv)[0]  # (Hq, D) at its position
    qn = rotate(qp, torch.tensor([n_local]), inv)[0]  # at n_local (far keys are unrotated)
    win = torch.cat((torch.arange(n_init), torch.arange(n_init + n_blocks * bs, p + 1)))
    kl = rotate(k[win].double(), win, inv)
    far = (p - win) >= n_local
    kr, klr = k[win].double().repeat_interleave(g, 1), kl.repeat_interleave(g, 1)  # (W, Hq, D)
    s_win = torch.where(far[None], torch.einsum("hd,whd->hw", qn, kr), torch.einsum("hd,whd->hw", ql, klr)) * scale
    kb = k[n_init : n_init + n_blocks * bs].double().view(n_blocks, bs, HKV, D).mean(1).repeat_interleave(g, 1)
    vb = v[n_init : n_init + n_blocks * bs].double().view(n_blocks, bs, HKV, D).mean(1).repeat_interleave(g, 1)
    s_blk = torch.einsum("hd,bhd->hb", qn, kb) * scale + math.log(bs)
    pr = torch.softmax(torch.cat((s_win, s_blk), 1), -1)
    vals = torch.cat((v[win].double().repeat_interleave(g, 1), vb))  # (W + NB, Hq, D)
    return torch.einsum("hn,nhd->hd", pr, vals)


@pytest.mark.parametrize("token_path", [True, False])
def test_every_block_unselected_equals_the_centroid_formula(token_path):
    """topk 0 (nothing selected): every block is its centroid column; decode steps one token at a time."""
    n_init, n_local, bs, t0, t = 8, 64, 16, 300, 420
    cfg = KVMemoryConfig(n_init=n_init, n_local=n_local, block_size=bs, compression="none",
                         policy=RetrievalPolicy(topk=0, unselected="centroid"))
    q, k, v = _qkv(t)
    inv, scale = default_inv_freq(D, 10000.0), D**-0.5
    mem = KVLayerStore(cfg, 0, HKV, D)
    mem.token_path = token_path
    mem.attend(q[:t0], k[:t0], v[:t0], 0, inv, scale)
    for p in range(t0, t):
        nb = mem.num_blocks
        out = mem.attend(q[p : p + 1], k[p : p + 1], v[p : p + 1], p, inv, scale)[0]
        ref = _centroid_reference(q, k, v, p, nb, inv, scale, n_init, n_local, bs)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    assert mem.num_blocks > 15


@pytest.mark.parametrize("chunks", [[1], [37, 100, 5, 64]])
def test_every_block_selected_is_still_dense(chunks):
    """top-k >= all blocks: no block is unselected, the centroid columns get -inf -- dense under the scheme."""
    t, n_init, n_local, bs = 400, 8, 64, 16
    cfg = KVMemoryConfig(n_init=n_init, n_local=n_local, block_size=bs, compression="none", repr_topk=3,
                         policy=RetrievalPolicy(topk=10_000, unselected="centroid"))
    q, k, v = _qkv(t, seed=1)
    inv, scale = default_inv_freq(D, 10000.0), D**-0.5
    mem = KVLayerStore(cfg, 0, HKV, D)
    outs = attend_in_chunks(mem, q, k, v, chunks, inv, scale)
    assert mem.num_blocks > 15
    torch.testing.assert_close(torch.cat(outs), reference_attention(q, k, v, inv, scale, n_init, n_local),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("compression", ["none", "int4"])
def test_token_path_equals_chunk_path_with_centroids(compression):
    """top-3 + sticky + next block + reused selections: the decode fast path gives the chunk path's output."""
    t, steps = 600, 120
    q, k, v = _qkv(t, seed=9, dtype=torch.float32)
    inv = default_inv_freq(D, 10000.0)
    cfg = KVMemoryConfig(n_init=8, n_local=64, block_size=16, compression=compression, key_group=16,
                         value_group=16, policy=RetrievalPolicy(topk=3, reselect_every=4, unselected="centroid"))
    fast, slow = KVLayerStore(cfg, 0, HKV, D), KVLayerStore(cfg, 0, HKV, D)
    slow.token_path = False
    for mem in (fast, slow):
        mem.attend(q[: t - steps], k[: t - steps], v[: t - steps], 0, inv, D**-0.5)
    for i in range(t - steps, t):
        of = fast.attend(q[i : i + 1], k[i : i + 1], v[i : i + 1], i, inv, D**-0.5)
        os_ = slow.attend(q[i : i + 1], k[i : i + 1], v[i : i + 1], i, inv, D**-0.5)
        torch.testing.assert_close(of, os_, rtol=1e-5, atol=1e-6)
    # and the centroids changed the answer (the option is not a no-op)
    drop = KVLayerStore(KVMemoryConfig(n_init=8, n_local=64, block_size=16, compression=compression, key_group=16,
                                       value_group=16, policy=RetrievalPolicy(topk=3, reselect_every=4)), 0, HKV, D)
    drop.attend(q[: t - 1], k[: t - 1], v[: t - 1], 0, inv, D**-0.5)
    assert not torch.allclose(drop.attend(q[-1:], k[-1:], v[-1:], t - 1, inv, D**-0.5), of, atol=1e-3)


def test_snapshot_without_centroids_rebuilds_them_from_the_memory_tier():
    """A state saved by a "drop" memory, loaded with "centroid": the centroids come from the stored blocks
    (exact for compression none), so the next step equals a memory that had the option on throughout."""
    t = 500
    q, k, v = _qkv(t, seed=3)
    inv, scale = default_inv_freq(D, 10000.0), D**-0.5
    kw = dict(n_init=8, n_local=64, block_size=16, compression="none")
    on = KVMemoryConfig(**kw, policy=RetrievalPolicy(topk=2, unselected="centroid"))
    a, b = KVLayerStore(KVMemoryConfig(**kw, policy=RetrievalPolicy(topk=2)), 0, HKV, D), KVLayerStore(on, 0, HKV, D)
    a.attend(q[:-1], k[:-1], v[:-1], 0, inv, scale)
    b.attend(q[:-1], k[:-1], v[:-1], 0, inv, scale)
    st = a.state_tensors()
    assert "cent_k" not in st and "cent_k" in b.state_tensors()
    c = KVLayerStore(on, 0, HKV, D)
    c.load_state(st)
    c.hq = HQ
    torch.testing.assert_close(c.attend(q[-1:], k[-1:], v[-1:], t - 1, inv, scale),
                               b.attend(q[-1:], k[-1:], v[-1:], t - 1, inv, scale), rtol=1e-9, atol=1e-9)


def test_rerank_scores_candidates_by_their_exact_max_key():
    """rerank: the best-n blocks by representative are re-scored by max q.k over all their keys (float64
    formula), the rest -inf; rerank >= all blocks with top-k >= all blocks is still dense."""
    t, n_init, n_local, bs = 400, 8, 64, 16
    q, k, v = _qkv(t, seed=5)
    inv, scale = default_inv_freq(D, 10000.0), D**-0.5
    cfg = KVMemoryConfig(n_init=n_init, n_local=n_local, block_size=bs, compression="none", repr_topk=2,
                         policy=RetrievalPolicy(topk=3, rerank=6))
    mem = KVLayerStore(cfg, 0, HKV, D)
    mem.record_scores = True
    mem.attend(q, k, v, 0, inv, scale)
    nb, g = mem.num_blocks, HQ // HKV
    qd, kd, vd = _qkv(1, seed=6)  # one decode query: its scores from the definition
    mem.attend(qd, kd, vd, t, inv, scale)
    qn = rotate(qd, torch.tensor([n_local]), inv)[0] * scale  # decode query: rotated at n_local, scaled
    # first stage: max over each block's representative keys, summed over the KV head's query heads
    rep = torch.einsum("hgd,hdnr->hgnr", qn.view(HKV, g, D), mem.reprs.get()).amax(-1).sum(1)  # (Hkv, NB)
    cand = torch.zeros(HKV, nb, dtype=torch.bool)
    cand.scatter_(1, rep.topk(6, dim=1).indices, True)
    keys = k[n_init : n_init + nb * bs].double().view(nb, bs, HKV, D)
    exact = torch.einsum("hgd,bshd->hgbs", qn.view(HKV, g, D), keys).amax(-1)  # (Hkv, G, NB)
    want = torch.where(cand[:, None], exact, float("-inf")).reshape(HQ, nb)
    torch.testing.assert_close(mem.last_scores, want, rtol=1e-9, atol=1e-9)
    # every block a candidate and selected: dense
    cfg = KVMemoryConfig(n_init=n_init, n_local=n_local, block_size=bs, compression="none",
                         policy=RetrievalPolicy(topk=10_000, rerank=10_000))
    mem = KVLayerStore(cfg, 0, HKV, D)
    out = torch.cat([mem.attend(q[p : p + 50], k[p : p + 50], v[p : p + 50], p, inv, scale) for p in range(0, t, 50)])
    torch.testing.assert_close(out, reference_attention(q, k, v, inv, scale, n_init, n_local), rtol=1e-9, atol=1e-9)


def test_repr_outliers_are_the_keys_farthest_from_the_block_mean():
    """repr_outliers n: each block's representatives = its repr_topk most-attended keys + the n keys farthest
    from its mean key (float64, from the packed keys); with every block selected attention is still dense."""
    t, n_init, n_local, bs = 400, 8, 64, 16
    q, k, v = _qkv(t, seed=7)
    inv, scale = default_inv_freq(D, 10000.0), D**-0.5
    cfg = KVMemoryConfig(n_init=n_init, n_local=n_local, block_size=bs, compression="none", repr_topk=2,
                         repr_outliers=3, policy=RetrievalPolicy(topk=10_000))
    mem = KVLayerStore(cfg, 0, HKV, D)
    out = torch.cat([mem.attend(q[p : p + 40], k[p : p + 40], v[p : p + 40], p, inv, scale) for p in range(0, t, 40)])
    torch.testing.assert_close(out, reference_attention(q, k, v, inv, scale, n_init, n_local), rtol=1e-9, atol=1e-9)
    nb = mem.num_blocks
    reps = mem.reprs.get()  # (Hkv, D, NB, 2 + 3)
    assert reps.shape == (HKV, D, nb, 5)
    blocks = k[n_init : n_init + nb * bs].double().view(nb, bs, HKV, D)
    for b in range(nb):
        for h in range(HKV):
            kb = blocks[b, :, h]  # (bs, D)
            far = (kb - kb.mean(0)).norm(dim=-1).topk(3).indices
            torch.testing.assert_close(reps[h, :, b, 2:].T, kb[far], rtol=0, atol=0)
    with pytest.raises(AssertionError, match="repr_outliers"):
        KVMemoryConfig(repr_outliers=2, policy=RetrievalPolicy(repr_mode="quest"))
