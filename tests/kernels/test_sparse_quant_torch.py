"""Torch paths (what runs on CPU) of block-sparse attention, merge, KIVI quantization, block
scoring/selection, PKM top-k and embedding bag — against float64 references and the properties
the issue lists."""

import pytest
import torch
from kernel_testlib import dense_attention_f64, gather_seq, make_paged
from memserve.kernels import (
    block_minmax,
    block_representatives,
    block_sparse_decode_attention,
    block_sparse_decode_attention_ref,
    dequantize_kv,
    embedding_bag,
    embedding_bag_columns,
    embedding_bag_ref,
    merge_attention,
    paged_decode_attention,
    pkm_topk,
    pkm_topk_ref,
    quantize_kv,
    score_blocks_infllm,
    score_blocks_quest,
    select_topk_blocks,
)
from memserve.kernels.block_scoring import score_blocks_infllm_ref, score_blocks_quest_ref
from memserve.kernels.kv_quant import dequant_block_heads, gather_dequant_ref

# ----------------------------------------------------------------------------- block-sparse attention


def _pool(NB, BS, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(NB, BS, Hkv, D, generator=g), torch.randn(NB, BS, Hkv, D, generator=g)


@pytest.mark.parametrize("Hq,Hkv,D,BS", [(9, 3, 64, 16), (4, 4, 72, 8), (8, 2, 32, 128)])
def test_all_blocks_selected_equals_dense(Hq, Hkv, D, BS):
    """Every block of the sequence selected (per head, in shuffled order) == dense attention."""
    lens = [BS * 3, BS * 5]
    kc, vc, bt, sl = make_paged(lens, Hkv, D, BS, torch.float32)
    q = torch.randn(2, Hq, D)
    nb = max(lens) // BS
    ids = torch.full((2, Hkv, nb), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        for h in range(Hkv):
            own = bt[b, :n // BS]
            ids[b, h, :n // BS] = own[torch.randperm(own.numel())]
    out, lse = block_sparse_decode_attention(q, kc, vc, ids, 0.125)
    for b, n in enumerate(lens):
        ro, rl = dense_attention_f64(q[b:b + 1], gather_seq(kc, bt[b], n), gather_seq(vc, bt[b], n), 0.125)
        torch.testing.assert_close(out[b].double(), ro[0], atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse[b].double(), rl[0], atol=2e-5, rtol=2e-5)


def test_ranges_only_equal_paged_decode():
    """sink [0, s) + window [ws, n) covering everything == paged decode; odd lengths."""
    lens = [37, 5, 50]
    kc, vc, bt, sl = make_paged(lens, 2, 24, 8, torch.float32)
    q = torch.randn(3, 6, 24)
    none = torch.empty(3, 2, 0, dtype=torch.int32)
    sink = torch.tensor([3, 0, 9], dtype=torch.int32)
    out, lse = block_sparse_decode_attention(q, kc, vc, none, 0.3, block_tables=bt, seq_lens=sl, sink_lens=sink,
                                             window_starts=sink.clone())
    ro, rl = paged_decode_attention(q, kc, vc, bt, sl, 0.3)
    torch.testing.assert_close(out, ro, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, rl, atol=1e-5, rtol=1e-5)


def _sparse_case(quant=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, D, BS, NB = 2, 6, 2, 72, 8, 12
    kp, vp = _pool(NB, BS, Hkv, D, seed)
    q = torch.randn(B, Hq, D, generator=g)
    ids = torch.tensor([[[3, -1, 5], [0, 1, 2]], [[7, 8, -1], [-1, -1, -1]]], dtype=torch.int32)
    rng = dict(block_tables=torch.tensor([[9, 10, 11, 4], [6, 4, 11, 10]], dtype=torch.int32),
               seq_lens=torch.tensor([29, 20], dtype=torch.int32), sink_lens=torch.tensor([3, 0], dtype=torch.int32),
               window_starts=torch.tensor([17, 9], dtype=torch.int32))
    if quant:
        kp, vp = quantize_kv(kp, "k", quant), quantize_kv(vp, "v", quant)
    return q, kp, vp, ids, rng


def _sparse_f64(q, kp, vp, ids, rng, scale):
    """Independent float64: list each (seq, head)'s tokens, dense softmax."""
    kf = (dequantize_kv(kp) if not torch.is_tensor(kp) else kp).double()
    vf = (dequantize_kv(vp) if not torch.is_tensor(vp) else vp).double()
    NB, BS, Hkv, D = kf.shape
    B, Hq, _ = q.shape
    G = Hq // Hkv
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq), float("-inf"), dtype=torch.float64)
    for b in range(B):
        logical = []
        if rng:
            n, s, w = int(rng["seq_lens"][b]), int(rng["sink_lens"][b]), int(rng["window_starts"][b])
            logical = sorted(set(range(min(s, n))) | set(range(w, n)))
        toks = [int(rng["block_tables"][b, t // BS]) * BS + t % BS for t in logical]
        for h in range(Hkv):
            rows = toks + [i * BS + t for i in ids[b, h].tolist() if i >= 0 for t in range(BS)]
            if not rows:
                continue
            k = kf.reshape(-1, Hkv, D)[rows, h]
            v = vf.reshape(-1, Hkv, D)[rows, h]
            s_ = q[b, h * G:(h + 1) * G].double() @ k.T * scale  # (G, n)
            lse[b, h * G:(h + 1) * G] = torch.logsumexp(s_, -1)
            out[b, h * G:(h + 1) * G] = torch.softmax(s_, -1) @ v
    return out, lse


@pytest.mark.parametrize("quant", [None, 8, 4])
@pytest.mark.parametrize("with_ranges", [False, True])
def test_block_sparse_torch_matches_f64(quant, with_ranges):
    q, kp, vp, ids, rng = _sparse_case(quant)
    rng = rng if with_ranges else {}
    ro, rl = _sparse_f64(q, kp, vp, ids, rng, 0.1)
    for fn in (block_sparse_decode_attention, block_sparse_decode_attention_ref):
        out, lse = fn(q, kp, vp, ids, 0.1, **rng)
        torch.testing.assert_close(out.double(), ro, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse.double(), rl, atol=2e-5, rtol=2e-5)
    if not with_ranges:  # batch 1, head 1 selected nothing: empty partial
        assert torch.isneginf(lse[1, 3:]).all() and (out[1, 3:] == 0).all()


def test_empty_selection_is_an_empty_partial():
    kp, vp = _pool(4, 16, 2, 32)
    q = torch.randn(3, 4, 32)
    out, lse = block_sparse_decode_attention(q, kp, vp, torch.empty(3, 2, 0, dtype=torch.int32), 0.2)
    assert torch.isneginf(lse).all() and (out == 0).all()


def test_tiers_merge_to_one_softmax():
    """fp window (ranges) + int8 memory tier, merged == the one-softmax f64 reference."""
    q, kp, vp, ids, rng = _sparse_case(None)
    kq, vq = quantize_kv(kp, "k", 8), quantize_kv(vp, "v", 8)
    none = torch.empty(2, 2, 0, dtype=torch.int32)
    a = block_sparse_decode_attention(q, kp, vp, none, 0.1, **rng)
    b = block_sparse_decode_attention(q, kq, vq, ids, 0.1)
    out, lse = merge_attention(*a, *b)
    # reference: dequantized memory blocks written into a copy of the fp pool at the same ids
    kmix, vmix = kp.clone(), vp.clone()
    sel = ids[ids >= 0].unique().long()
    kmix[sel], vmix[sel] = dequantize_kv(kq)[sel], dequantize_kv(vq)[sel]
    ro, rl = _sparse_f64(q, kmix, vmix, ids, rng, 0.1)
    torch.testing.assert_close(out.double(), ro, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), rl, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- merge


@pytest.mark.parametrize("split", [1, 10, 29])
def test_merged_partials_equal_one_attention(split):
    k, v, q = torch.randn(30, 2, 40), torch.randn(30, 2, 40), torch.randn(1, 4, 40)
    full_o, full_l = dense_attention_f64(q, k, v, 0.15)
    a = dense_attention_f64(q, k[:split], v[:split], 0.15)
    b = dense_attention_f64(q, k[split:], v[split:], 0.15)
    out, lse = merge_attention(a[0].float(), a[1].float(), b[0].float(), b[1].float())
    torch.testing.assert_close(out.double(), full_o, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse.double(), full_l, atol=1e-6, rtol=1e-6)


def test_merge_with_empty_partials():
    o = torch.randn(2, 3, 8)
    lse = torch.randn(2, 3)
    empty_l = torch.full((2, 3), float("-inf"))
    out, l2 = merge_attention(o, lse, torch.full_like(o, float("nan")).nan_to_num(5.0), empty_l)
    torch.testing.assert_close(out, o)
    torch.testing.assert_close(l2, lse)
    out, l3 = merge_attention(o, empty_l, o, empty_l)
    assert (out == 0).all() and torch.isneginf(l3).all()


# ----------------------------------------------------------------------------- KIVI


@pytest.mark.parametrize("kind", ["k", "v"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(3, 128, 3, 64), (2, 20, 2, 72), (1, 1, 1, 2)])
def test_quant_error_within_half_scale(kind, bits, shape):
    x = torch.randn(*shape) * 3 + 1
    qx = quantize_kv(x, kind, bits)
    N, BS, H, D = shape
    assert qx.data.dtype == torch.uint8 and qx.data.shape[-1] == (D if bits == 8 else D // 2)
    xh = dequantize_kv(qx)
    if kind == "k":  # per-channel groups of 32 tokens
        sc = qx.scale.repeat_interleave(32, 1)[:, :BS]
        assert qx.scale.shape == (N, -(-BS // 32), H, D)
    else:  # per-token groups of 32 channels
        sc = qx.scale.repeat_interleave(32, 3)[..., :D]
        assert qx.scale.shape == (N, BS, H, -(-D // 32))
    err = (x.double() - xh.double()).abs()
    assert (err <= sc.double() / 2 + 1e-6 * x.abs().double().max()).all()
    # asymmetric: group min and max are reproduced (codes 0 and 2^b - 1)
    if kind == "v" and D >= 32:
        torch.testing.assert_close(xh[..., :32].amin(-1), x[..., :32].amin(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(xh[..., :32].amax(-1), x[..., :32].amax(-1), atol=1e-5, rtol=0)
    # gather-dequant of selected rows equals the full dequant
    tok = torch.tensor([[0], [N * BS - 1]])
    head = torch.arange(H)[None, :]
    torch.testing.assert_close(gather_dequant_ref(qx, tok, head), xh.reshape(N * BS, H, D)[tok, head])
    # block selection keeps metadata with its block
    ids = torch.tensor([N - 1, 0])
    torch.testing.assert_close(dequantize_kv(qx.select(ids)), xh[ids])
    # (block, head) pairs, repeats and any order: the KV memory's decode refills
    ids, heads = torch.tensor([N - 1, 0, N - 1]), torch.tensor([0, H - 1, H - 1])
    torch.testing.assert_close(dequant_block_heads(qx, ids, heads), xh[ids, :, heads])


def test_quant_constant_group_is_exact():
    x = torch.full((1, 32, 1, 32), 0.7)
    for kind in "kv":
        torch.testing.assert_close(dequantize_kv(quantize_kv(x, kind, 4)), x)


@pytest.mark.parametrize("kind", ["k", "v"])
def test_quant_fp16_metadata(kind):
    """meta_dtype=fp16 (the KV memory tier's setting): half the metadata bytes, and codes are computed
    against the rounded scale/zero, so the half-scale bound holds with the stored fp16 scale up to the
    fp16 rounding of zero and scale (<= 2^-11 relative each)."""
    x = torch.randn(2, 72, 2, 72) * 3 + 1
    q16 = quantize_kv(x, kind, 4, 64, meta_dtype=torch.float16)
    q32 = quantize_kv(x, kind, 4, 64)
    assert q16.scale.dtype == q16.zero.dtype == torch.float16 and q32.scale.dtype == torch.float32
    assert q16.nbytes() == q32.data.numel() + q32.scale.numel() * 2 * 2
    xh = dequantize_kv(q16)
    assert xh.dtype == torch.float32
    dim, n = (1, 72) if kind == "k" else (3, 72)
    sc = q16.scale.double().repeat_interleave(64, dim).narrow(dim, 0, n)
    err = (x.double() - xh.double()).abs()
    assert (err <= sc / 2 + 3 * 2**-11 * x.abs().max().double()).all()
    assert err.max() < 2 * (x.double() - dequantize_kv(q32).double()).abs().max()


# ----------------------------------------------------------------------------- scoring / selection


def test_quest_bound_holds_on_random_pages():
    g = torch.Generator().manual_seed(1)
    NB, BS, Hkv, D, Hq = 40, 16, 2, 48, 6
    k = torch.randn(NB, BS, Hkv, D, generator=g)
    q = torch.randn(3, Hq, D, generator=g)
    kmin, kmax = block_minmax(k)
    cand = torch.arange(NB, dtype=torch.int32).repeat(3, 1)
    bound = score_blocks_quest(q, kmin, kmax, cand)  # (3, Hq, NB)
    kk = k.repeat_interleave(Hq // Hkv, dim=2)  # (NB, BS, Hq, D)
    true = torch.einsum("bhd,nthd->bhnt", q.double(), kk.double()).amax(-1)  # (3, Hq, NB)
    assert (bound.double() >= true - 1e-4).all()
    torch.testing.assert_close(bound, score_blocks_quest_ref(q, kmin, kmax, cand), atol=1e-4, rtol=1e-5)


def test_block_minmax_ignores_padding_rows():
    k = torch.randn(2, 8, 1, 4)
    k[0, 5:] = 100.0
    lo, hi = block_minmax(k, torch.tensor([5, 8]))
    torch.testing.assert_close(hi[0], k[0, :5].amax(0))


def test_infllm_scores_and_selection():
    g = torch.Generator().manual_seed(2)
    B, Hq, Hkv, D, NB = 2, 9, 3, 64, 30
    q = torch.randn(B, Hq, D, generator=g)
    reprs = torch.randn(NB, Hkv, D, generator=g)
    cand = torch.tensor([list(range(0, 20)), list(range(10, 25)) + [-1] * 5], dtype=torch.int32)
    s = score_blocks_infllm(q, reprs, cand)
    ref = torch.einsum("bhd,bchd->bhc", q.view(B, Hkv, 3, D).double().mean(2), reprs[cand.long().clamp_min(0)].double())
    torch.testing.assert_close(s.double()[:, :, :15], ref[:, :, :15], atol=1e-5, rtol=1e-5)
    assert torch.isneginf(s[1, :, 15:]).all()
    torch.testing.assert_close(s, score_blocks_infllm_ref(q, reprs, cand), atol=1e-5, rtol=1e-5, equal_nan=True)
    ids = select_topk_blocks(s, cand, 4, Hkv)
    assert ids.shape == (B, Hkv, 4) and ids.dtype == torch.int32
    for b in range(B):
        for h in range(Hkv):
            want = cand[b][s[b, h].topk(4).indices].sort().values
            assert torch.equal(ids[b, h], want)
    shared = select_topk_blocks(s, cand, 4, Hkv, shared=True)
    assert (shared == shared[:, :1]).all()
    assert torch.equal(shared[0, 0], cand[0][s[0].sum(0).topk(4).indices].sort().values)
    # more slots than valid candidates: -1 padded at the end
    few = select_topk_blocks(s, cand, 18, Hkv)
    assert (few[1, :, 15:] == -1).all() and (few[1, :, :15] >= 0).all()


def test_block_representatives_are_mean_of_top_attended_keys():
    k = torch.randn(2, 16, 3, 8)
    sc = torch.rand(2, 16, 3)
    r = block_representatives(k, sc, topk=4)
    top = sc[1, :, 2].topk(4).indices
    torch.testing.assert_close(r[1, 2], k[1, top, 2].mean(0))


# ----------------------------------------------------------------------------- PKM / embedding bag


@pytest.mark.parametrize("T,H,Dk,n,k", [(5, 4, 32, 32, 8), (1, 1, 10, 17, 3), (3, 2, 16, 16, 16)])
def test_pkm_topk_matches_brute_force(T, H, Dk, n, k):
    q, keys = torch.randn(T, H, Dk), torch.randn(H, 2, n, Dk // 2)
    idx, w = pkm_topk(q, keys, k)
    ridx, rw = pkm_topk_ref(q, keys, k)
    assert idx.dtype == torch.int64 and idx.shape == (T, H * k) and w.dtype == torch.float32
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(w, rw, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w.view(T, H, k).sum(-1), torch.ones(T, H))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("E", [576, 7])
def test_embedding_bag_and_column_slices(dtype, E):
    table = torch.randn(300, E).to(dtype)
    idx = torch.randint(0, 300, (6, 33))
    idx[:, 1] = idx[:, 0]  # duplicates add up
    w = torch.rand(6, 33)
    ref = embedding_bag_ref(table, idx, w, out_dtype=torch.float64)
    out = embedding_bag(table, idx, w)
    assert out.dtype == dtype
    # fp32 accumulation: the final rounding to `dtype` + K fp32 additions (a classic bound)
    absum = embedding_bag_ref(table.abs(), idx, w, out_dtype=torch.float64).max().item()
    bound = torch.finfo(dtype).eps * ref.abs().max().item() + 33 * torch.finfo(torch.float32).eps * absum
    assert (out.double() - ref).abs().max().item() <= bound
    cuts = [0, 1, E // 2, E]
    parts = [embedding_bag_columns(table, idx, w, a, b, out_dtype=torch.float32) for a, b in zip(cuts, cuts[1:])]
    full32 = embedding_bag(table, idx, w, out_dtype=torch.float32)
    torch.testing.assert_close(torch.cat(parts, 1), full32, atol=1e-5, rtol=1e-6)
    shard = embedding_bag(table[:, cuts[2]:].contiguous(), idx, w, out_dtype=torch.float32)
    torch.testing.assert_close(shard, full32[:, cuts[2]:], atol=1e-5, rtol=1e-6)
    unweighted = embedding_bag(table, idx, None, out_dtype=torch.float32)
    torch.testing.assert_close(unweighted.double(), embedding_bag_ref(table, idx, None, out_dtype=torch.float64),
                               atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("E", [576, 7])
def test_embedding_bag_int8_rows_dequantized_in_the_bag(E):
    """int8 table + per-row scales vs the float64 bag of the dequantized rows (q * scale): the same
    sum, so only fp32 accumulation error; and vs the fp32 table: the quantization error, bounded by
    half a step per element (scale / 2 per row) times sum|w|."""
    from memserve.kernels import quantize_rows_int8

    g = torch.Generator().manual_seed(0)
    table = torch.randn(300, E, generator=g) * torch.rand(300, 1, generator=g)  # rows of different ranges
    table[5] = 0  # an all-zero row: scale 0
    q, s = quantize_rows_int8(table)
    assert q.dtype == torch.int8 and s.shape == (300,) and s[5] == 0 and int(q.abs().max()) == 127
    idx = torch.randint(0, 300, (6, 33), generator=g)
    idx[:, 1] = idx[:, 0]
    idx[0, 2] = 5
    w = torch.rand(6, 33, generator=g)
    deq = q.double() * s.double()[:, None]
    ref = embedding_bag_ref(deq, idx, w, out_dtype=torch.float64)
    assert torch.equal(embedding_bag_ref(q, idx, w, out_dtype=torch.float64, scales=s), ref)
    out = embedding_bag(q, idx, w, scales=s)
    assert out.dtype == torch.float32
    absum = embedding_bag_ref(deq.abs(), idx, w, out_dtype=torch.float64).max().item()
    assert (out.double() - ref).abs().max().item() <= 2 * 33 * torch.finfo(torch.float32).eps * absum
    half_step = (w * s[idx] / 2).sum(1, keepdim=True).double()  # per token: sum_k w_k * scale_k / 2
    assert ((out.double() - embedding_bag_ref(table, idx, w, out_dtype=torch.float64)).abs() <= half_step + 1e-6).all()
    cuts = [0, 1, E // 2, E]
    parts = [embedding_bag_columns(q, idx, w, a, b, scales=s) for a, b in zip(cuts, cuts[1:])]
    torch.testing.assert_close(torch.cat(parts, 1), out, atol=1e-5, rtol=1e-6)
    with pytest.raises(ValueError, match="int8 table needs per-row scales"):
        embedding_bag(q, idx, w)
    with pytest.raises(ValueError, match="scales must be float"):
        embedding_bag(q, idx, w, scales=s[:10])


@pytest.mark.parametrize("layout", ["runs", "scattered", "runs_with_pad"])
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("quant", [None, 4])
def test_shared_selection_paths(layout, B, quant):
    """Selections shared by all heads take the whole-block paths (zero-copy runs of consecutive
    pool blocks for one sequence, contiguous gathers otherwise); all must equal the f64 reference."""
    BS, Hkv, D, NB = 8, 3, 32, 40
    kp, vp = _pool(NB, BS, Hkv, D, seed=5)
    q = torch.randn(B, 9, D)
    if layout == "scattered":
        row = torch.randperm(NB)[:16]
    else:
        row = torch.cat([torch.arange(3, 13), torch.arange(20, 30)])  # two runs of 10 blocks
    ids = row.int().view(1, 1, -1).repeat(B, Hkv, 1)
    if layout == "runs_with_pad":
        ids[:, :, 4] = -1
    if quant:
        kp, vp = quantize_kv(kp, "k", quant), quantize_kv(vp, "v", quant)
    out, lse = block_sparse_decode_attention(q, kp, vp, ids, 0.2)
    ro, rl = _sparse_f64(q, kp, vp, ids, {}, 0.2)
    torch.testing.assert_close(out.double(), ro, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), rl, atol=2e-5, rtol=2e-5)


def test_mixed_fp_keys_int4_values():
    q, kp, vp, ids, rng = _sparse_case(None)
    vq = quantize_kv(vp, "v", 4)
    shared = torch.arange(4, 8, dtype=torch.int32).view(1, 1, 4).repeat(2, 2, 1)
    for sel in (ids, shared, shared[:1]):
        qq = q[:sel.shape[0]]
        out, lse = block_sparse_decode_attention(qq, kp, vq, sel, 0.1)
        ro, rl = _sparse_f64(qq, kp, dequantize_kv(vq), sel, {}, 0.1)
        torch.testing.assert_close(out.double(), ro, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse.double(), rl, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("with_ranges", [False, True])
def test_shared_selection_with_an_all_padding_sequence(with_ranges):
    """Sequence 1 selected nothing (all -1): an empty partial, or just its ranges."""
    q, kp, vp, _, rng = _sparse_case(None)
    ids = torch.tensor([[[5, 2, 7]] * 2, [[-1, -1, -1]] * 2], dtype=torch.int32)
    rng = rng if with_ranges else {}
    out, lse = block_sparse_decode_attention(q, kp, vp, ids, 0.1, **rng)
    ro, rl = _sparse_f64(q, kp, vp, ids, rng, 0.1)
    torch.testing.assert_close(out.double(), ro, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), rl, atol=2e-5, rtol=2e-5)
    if not with_ranges:
        assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()
