"""KV-memory block selection per granularity and eviction order (runtime/kv_memory/selection.py), and the
block-scoring op they rank by."""

import torch
from memserve.kernels import score_block_reprs
from memserve.runtime.kv_memory.selection import blocks_to_evict, select_blocks


def block_scores(q, reprs, mode):
    return score_block_reprs(q[None], [reprs], mode)[0]


def test_block_scores_match_explicit_loops():
    g = torch.Generator().manual_seed(0)
    hq, hkv, nb, r, d = 6, 2, 5, 3, 8
    q = torch.randn(hq, d, generator=g, dtype=torch.float64)
    reprs = torch.randn(nb, hkv, r, d, generator=g, dtype=torch.float64)
    s = block_scores(q, reprs.permute(1, 3, 0, 2), "max")  # stored column-major (Hkv, D, NB, R)
    for h in range(hq):
        for b in range(nb):
            assert torch.isclose(s[h, b], max(q[h] @ reprs[b, h // 3, i] for i in range(r)))
    quest = torch.stack((reprs.amin(2), reprs.amax(2)), 2)  # (NB, Hkv, 2, D)
    s = block_scores(q, quest.permute(1, 3, 0, 2), "quest")
    for h in range(hq):
        for b in range(nb):
            lo, hi = quest[b, h // 3, 0], quest[b, h // 3, 1]
            assert torch.isclose(s[h, b], torch.maximum(q[h] * lo, q[h] * hi).sum())
    # Quest's bound really bounds q.k for every key between min and max
    keys = lo + (hi - lo) * torch.rand(50, d, generator=g, dtype=torch.float64)
    assert (keys @ q[h] <= s[h, b] + 1e-12).all()


def test_select_granularities():
    scores = torch.tensor([[5.0, 1, 0, 9], [0, 10, 1, 0], [1, 0, 7, 0], [0, 0, 1, 6]])  # (Hq=4, NB=4)
    idx, valid, mask = select_blocks(scores, 1, "q_head", num_kv_heads=2)
    assert idx[:, 0].tolist() == [3, 1, 2, 3] and valid.all()
    idx, valid, mask = select_blocks(scores, 1, "kv_head", num_kv_heads=2)
    assert idx[:, 0].tolist() == [1, 1, 2, 2]  # group sums [5, 11, 1, 9] and [1, 0, 8, 6]
    idx, valid, mask = select_blocks(scores, 2, "shared", num_kv_heads=2)
    assert (mask == mask[0]).all() and mask[0].tolist() == [False, True, False, True]  # sums [6, 11, 9, 15]
    extra = torch.zeros(4, 4, dtype=torch.bool)
    extra[0, 0] = True
    idx, valid, mask = select_blocks(scores, 1, "q_head", num_kv_heads=2, extra=extra)
    assert idx.shape == (4, 2) and valid.sum(1).tolist() == [2, 1, 1, 1]
    assert idx[0].tolist() == [0, 3]  # picks listed in block order
    # next_blocks: the block after each of the best picks joins (not past the last block)
    _, _, mask = select_blocks(scores, 2, "q_head", num_kv_heads=2, next_blocks=1)
    assert mask.int().tolist() == [[1, 0, 0, 1], [0, 1, 1, 0], [1, 0, 1, 1], [0, 0, 1, 1]]
    _, _, mask = select_blocks(scores, 1, "q_head", num_kv_heads=2, next_blocks=0)
    assert mask.sum().item() == 4


def test_eviction_least_selected_oldest_first():
    counts = torch.tensor([3, 0, 5, 0, 1])
    assert blocks_to_evict(counts, 100, 500, 500).numel() == 0
    assert blocks_to_evict(counts, 100, 500, 301).tolist() == [1, 3]
    assert blocks_to_evict(counts, 100, 500, 250).tolist() == [1, 3, 4]
