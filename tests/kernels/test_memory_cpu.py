"""The C++ memory-layer kernels (kernels/memory_cpu.cpp) against independent references: the product-key
selection against the float64 brute force over all n_keys**2 slots (pkm_topk_ref) and torch's two-stage
path; the fused bag against the float64 gather-and-sum (embedding_bag_ref) for fp32 / bf16 / fp16 / int8
rows, column slices bit-identical to the full bag's columns."""

from __future__ import annotations

import pytest
import torch
from memserve.kernels import embedding_bag_ref, pkm_topk_ref, quantize_rows_int8
from memserve.kernels.embedding_bag import embedding_bag_cpu
from memserve.kernels.memory_cpu import build_error, load_extension
from memserve.kernels.pkm import pkm_topk_cpu, pkm_topk_torch

torch.set_num_threads(1)

pytestmark = pytest.mark.skipif(load_extension() is None, reason=f"C++ extension not built: {build_error()}")


@pytest.mark.parametrize("T,H,Dk,n,k", [(5, 4, 32, 32, 8), (1, 1, 10, 17, 3), (3, 2, 16, 16, 16), (2, 3, 8, 40, 1)])
def test_pkm_select_matches_brute_force(T, H, Dk, n, k):
    g = torch.Generator().manual_seed(T * 100 + n)
    q, keys = torch.randn(T, H, Dk, generator=g), torch.randn(H, 2, n, Dk // 2, generator=g)
    idx, w = pkm_topk_cpu(q, keys, k)
    ridx, rw = pkm_topk_ref(q, keys, k)
    assert idx.dtype == torch.int64 and idx.shape == (T, H * k) and w.dtype == torch.float32
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(w, rw, atol=1e-6, rtol=1e-5)


def test_pkm_select_matches_torch_path_at_full_size():
    """1024 sub-keys, knn 32, 4 heads, 16 tokens (the bench model's shape): the same slots in the same order
    as torch's topk path, weights within fp32 rounding of its softmax."""
    g = torch.Generator().manual_seed(7)
    q, keys = torch.randn(16, 4, 256, generator=g), torch.randn(4, 2, 1024, 128, generator=g)
    idx, w = pkm_topk_cpu(q, keys, 32)
    tidx, tw = pkm_topk_torch(q, keys, 32)
    assert torch.equal(idx, tidx)
    torch.testing.assert_close(w, tw, atol=1e-7, rtol=1e-6)


def _select_reference(s, k):
    """pkm_select's contract from its definition, in Python: per (head, token), the top-k of each half's
    scores ordered by (score desc, index asc), the k x k fp32 sums at position i * k + j ordered by (sum desc,
    position asc), top k of those, softmax in float64."""
    H, _, T, n = s.shape
    idx = torch.empty(T, H * k, dtype=torch.int64)
    w = torch.empty(T, H * k, dtype=torch.float64)
    for h in range(H):
        for t in range(T):
            tops = []
            for half in range(2):
                row = s[h, half, t].tolist()
                tops.append(sorted(range(n), key=lambda j, row=row: (-row[j], j))[:k])
            a, b = s[h, 0, t][tops[0]], s[h, 1, t][tops[1]]
            sums = (a[:, None] + b[None, :]).reshape(-1).tolist()  # fp32 additions, as torch's cartesian tensor
            best = sorted(range(k * k), key=lambda p: (-sums[p], p))[:k]
            idx[t, h * k:(h + 1) * k] = torch.tensor([tops[0][p // k] * n + tops[1][p % k] for p in best])
            w[t, h * k:(h + 1) * k] = torch.softmax(torch.tensor([sums[p] for p in best], dtype=torch.float64), 0)
    return idx, w


@pytest.mark.parametrize("H,T,n,k,levels", [(2, 3, 1024, 32, 0), (1, 2, 1000, 32, 0), (3, 2, 37, 5, 0),
                                            (2, 2, 16, 16, 0), (1, 3, 50, 1, 0), (2, 3, 256, 8, 4),
                                            (1, 2, 1024, 32, 3)])
def test_pkm_select_matches_its_definition_with_ties(H, T, n, k, levels):
    """The selection's order, ties included: scores drawn from a few levels (levels > 0) tie in both halves and
    in the k x k sums; -0.0 next to 0.0; n not a multiple of the 16-wide vector; k = n; k = 1."""
    g = torch.Generator().manual_seed(n * 10 + k + levels)
    s = torch.randn(H, 2, T, n, generator=g)
    if levels:
        s = torch.randint(0, levels, (H, 2, T, n), generator=g).float() - (levels - 1) / 2
        s[s == 0] = torch.where(torch.rand(int((s == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
    idx, w = load_extension().pkm_select(s, k)
    ridx, rw = _select_reference(s, k)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(w.double(), rw, atol=1e-7, rtol=1e-6)


def test_pkm_select_nan_scores_stay_in_range():
    """NaN scores (no valid threshold) take the full-sort fallback: indices stay valid slots, nothing crashes."""
    s = torch.randn(2, 2, 3, 64)
    s[0, 0, 1, ::3] = float("nan")
    s[1, 1, 2] = float("nan")
    idx, w = load_extension().pkm_select(s, 8)
    assert idx.min().item() >= 0 and idx.max().item() < 64 * 64
    ok = torch.ones_like(idx, dtype=torch.bool)
    ok[1, 0:8] = False  # token 1, head 0 and token 2, head 1 saw NaN
    ok[2, 8:16] = False
    ridx, _ = _select_reference(torch.nan_to_num(s, nan=-1e30), 8)
    assert torch.equal(idx[ok], ridx[ok])


def _bound(table, idx, w, scales=None):
    absum = embedding_bag_ref(table.abs(), idx, w, out_dtype=torch.float64,
                              scales=None if scales is None else scales.abs()).max().item()
    return 2 * idx.shape[1] * torch.finfo(torch.float32).eps * absum


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("E", [576, 7, 64])
def test_bag_matches_float64_reference_and_column_slices(dtype, E):
    g = torch.Generator().manual_seed(E)
    full = torch.randn(300, E, generator=g)
    scales = None
    if dtype == torch.int8:
        table, scales = quantize_rows_int8(full)
    else:
        table = full.to(dtype)
    idx = torch.randint(0, 300, (6, 33), generator=g)
    idx[:, 1] = idx[:, 0]  # duplicates add up
    w = torch.rand(6, 33, generator=g)
    ref = embedding_bag_ref(table, idx, w, out_dtype=torch.float64, scales=scales)
    out = embedding_bag_cpu(table, idx, w, out_dtype=torch.float32, scales=scales)
    assert out.dtype == torch.float32 and out.shape == (6, E)
    assert (out.double() - ref).abs().max().item() <= _bound(table, idx, w, scales)
    # a column range equals those columns of the full bag exactly (shards by embedding dimension)
    cuts = [0, 1, E // 2, E]
    parts = [embedding_bag_cpu(table, idx, w, torch.float32, a, b, scales=scales) for a, b in zip(cuts, cuts[1:])
             if b > a]
    assert torch.equal(torch.cat(parts, 1), out)
    # unweighted, int32 indices
    ref1 = embedding_bag_ref(table, idx, None, out_dtype=torch.float64, scales=scales)
    out1 = embedding_bag_cpu(table, idx.int(), None, out_dtype=torch.float32, scales=scales)
    assert (out1.double() - ref1).abs().max().item() <= _bound(table, idx, None, scales)


def test_bag_strided_rows_and_errors():
    """Rows of a wider buffer (stride > E: the bench's fbgemm-layout int8 view) read right; bad input raises."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(50, 20, generator=g)
    view = wide[:, 4:16]
    idx = torch.randint(0, 50, (3, 9), generator=g)
    w = torch.rand(3, 9, generator=g)
    out = embedding_bag_cpu(view, idx, w)
    ref = embedding_bag_ref(view.contiguous(), idx, w, out_dtype=torch.float64)
    assert (out.double() - ref).abs().max().item() <= _bound(view, idx, w)
    ext = load_extension()
    with pytest.raises(IndexError):
        ext.bag(view, torch.tensor([[50]]), None, None, 0, 12)
    with pytest.raises(ValueError, match="needs scales"):
        ext.bag(torch.zeros(4, 4, dtype=torch.int8), torch.tensor([[1]]), None, None, 0, 4)
    with pytest.raises(ValueError, match="k <= n_keys"):
        ext.pkm_select(torch.zeros(1, 2, 1, 4), 5)
