"""Every Triton kernel, run by Triton's interpreter on CPU (TRITON_INTERPRET=1), against its torch
reference and a float64 computation. Odd shapes (head dim 72, row width 576, lengths that are not
a multiple of the block size, GQA ratios 1/3/4, one token, empty selections), fp32/fp16/bf16,
outputs poisoned (NaN / sentinel) so unwritten elements fail, error budgets relative to torch's own
error in the same dtype. Shapes stay tiny: the interpreter runs a program at a time in numpy.

Triton fixes interpreter mode when `triton` is first imported (its own tl.sum / tl.topk / ... are
jitted then), so these cases run in a fresh process: `test_triton_interpret.py` launches
`TRITON_INTERPRET=1 pytest tests/kernels/test_triton_cases.py`; in a normal session they skip.
Run them directly with that command to see each case."""

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 from process start (see test_triton_interpret.py)", allow_module_level=True)

import torch  # noqa: E402
from kernel_testlib import (
    DTYPES,
    assert_within_torch_error,
    dense_attention_f64,
    dense_attention_lowp,
    gather_seq,
    make_paged,
    poisoned_outputs,
)
from memserve.kernels.block_scoring import (
    block_minmax,
    score_blocks_infllm_ref,
    score_blocks_quest_ref,
    score_blocks_triton,
)
from memserve.kernels.block_sparse_attention import block_sparse_decode_attention_triton
from memserve.kernels.embedding_bag import embedding_bag_ref, embedding_bag_triton
from memserve.kernels.kv_quant import (
    dequantize_kv_ref,
    dequantize_kv_triton,
    quantize_kv_ref,
    quantize_kv_triton,
)
from memserve.kernels.merge import merge_attention_ref, merge_attention_triton
from memserve.kernels.paged_attention import paged_decode_attention_triton
from memserve.kernels.pkm import pkm_topk_ref, pkm_topk_triton


# ----------------------------------------------------------------------------- paged decode
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens,Hq,Hkv,D,BS,tps", [
    ([1], 4, 4, 16, 16, None),  # GQA 1, one token
    ([17, 1, 50], 9, 3, 64, 16, 1),  # GQA 3 (default model), split-K with one block per split
    ([33, 8, 5], 8, 2, 72, 8, 2),  # GQA 4, head dim 72, odd lengths
])
def test_paged_decode_triton(dtype, lens, Hq, Hkv, D, BS, tps):
    kc, vc, bt, sl = make_paged(lens, Hkv, D, BS, dtype)
    q = torch.randn(len(lens), Hq, D).to(dtype)
    scale = D ** -0.5
    with poisoned_outputs():
        out, lse = paged_decode_attention_triton(q, kc, vc, bt, sl, scale, tiles_per_split=tps)
    assert out.dtype == dtype and lse.dtype == torch.float32
    for b, n in enumerate(lens):
        k, v = gather_seq(kc, bt[b], n), gather_seq(vc, bt[b], n)
        ro, rl = dense_attention_f64(q[b:b + 1], k, v, scale)
        assert_within_torch_error(out[b:b + 1], ro, dense_attention_lowp(q[b:b + 1], k, v, scale))
        torch.testing.assert_close(lse[b].double(), rl[0], atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- block-sparse
def _sparse_inputs(Hq, Hkv, D, BS, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, NB = 2, 10
    kp = torch.randn(NB, BS, Hkv, D, generator=g).to(dtype)
    vp = torch.randn(NB, BS, Hkv, D, generator=g).to(dtype)
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    ids = torch.randint(0, NB, (B, Hkv, 3), generator=g, dtype=torch.int32)
    ids[0, 0, 1] = -1  # unused slot
    ids[1, -1, :] = -1  # a head with an empty selection
    rng = dict(block_tables=torch.randperm(NB, generator=g)[:8].view(2, 4).int(),
               seq_lens=torch.tensor([4 * BS - 3, 2 * BS + 1], dtype=torch.int32),
               sink_lens=torch.tensor([2, 0], dtype=torch.int32),
               window_starts=torch.tensor([3 * BS - 5, BS + 1], dtype=torch.int32))
    return q, kp, vp, ids, rng


def _sparse_rows(ids, rng, b, h, BS):
    logical = []
    if rng:
        n, s, w = int(rng["seq_lens"][b]), int(rng["sink_lens"][b]), int(rng["window_starts"][b])
        logical = sorted(set(range(min(s, n))) | set(range(w, n)))
    toks = [int(rng["block_tables"][b, t // BS]) * BS + t % BS for t in logical]
    return toks + [i * BS + t for i in ids[b, h].tolist() if i >= 0 for t in range(BS)]


def _check_sparse(out, lse, q, kf, vf, ids, rng, scale):
    """f64 reference per (seq, kv head) + torch's own error on the same rows in q's dtype."""
    NB, BS, Hkv, D = kf.shape
    G = q.shape[1] // Hkv
    for b in range(q.shape[0]):
        for h in range(Hkv):
            rows = _sparse_rows(ids, rng, b, h, BS)
            hs = slice(h * G, (h + 1) * G)
            if not rows:
                assert torch.isneginf(lse[b, hs]).all() and (out[b, hs] == 0).all()
                continue
            k = kf.reshape(-1, Hkv, D)[rows, h].unsqueeze(1)  # (n, 1, D)
            v = vf.reshape(-1, Hkv, D)[rows, h].unsqueeze(1)
            qq = q[b:b + 1, hs]
            ro, rl = dense_attention_f64(qq, k, v, scale)
            assert_within_torch_error(out[b:b + 1, hs], ro, dense_attention_lowp(qq, k.to(q.dtype), v.to(q.dtype), scale))
            torch.testing.assert_close(lse[b, hs].double(), rl[0], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hq,Hkv,D,BS,with_ranges,tile", [
    (4, 4, 16, 16, True, None),
    (6, 2, 72, 8, True, 4),  # blocks cut into 2 sub-tiles (as InfLLM's 128-token blocks are on GPU)
    (12, 3, 32, 4, False, None),
])
def test_block_sparse_triton_fp(dtype, Hq, Hkv, D, BS, with_ranges, tile):
    q, kp, vp, ids, rng = _sparse_inputs(Hq, Hkv, D, BS, dtype)
    rng = rng if with_ranges else {}
    with poisoned_outputs():
        out, lse = block_sparse_decode_attention_triton(q, kp, vp, ids, 0.2, tiles_per_split=2, tile=tile, **rng)
    _check_sparse(out, lse, q, kp, vp, ids, rng, 0.2)


@pytest.mark.parametrize("kbits,vbits", [(8, 8), (4, 4), (8, 4)])
@pytest.mark.parametrize("D", [72, 64])
def test_block_sparse_triton_quantized(kbits, vbits, D):
    """In-kernel dequant: must equal attention over the dequantized pool."""
    q, kp, vp, ids, rng = _sparse_inputs(6, 2, D, 8, torch.float32, seed=3)
    kq, vq = quantize_kv_ref(kp, "k", kbits), quantize_kv_ref(vp, "v", vbits)
    with poisoned_outputs():
        out, lse = block_sparse_decode_attention_triton(q, kq, vq, ids, 0.2, tile=4, **rng)
    _check_sparse(out, lse, q, dequantize_kv_ref(kq), dequantize_kv_ref(vq), ids, rng, 0.2)


def test_block_sparse_triton_all_selected_equals_dense():
    lens = [3 * 8, 5 * 8]
    kc, vc, bt, sl = make_paged(lens, 3, 40, 8, torch.float32)
    q = torch.randn(2, 9, 40)
    ids = torch.full((2, 3, 5), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        ids[b, :, :n // 8] = bt[b, :n // 8].flip(0)
    with poisoned_outputs():
        out, lse = block_sparse_decode_attention_triton(q, kc, vc, ids, 0.15)
    for b, n in enumerate(lens):
        ro, rl = dense_attention_f64(q[b:b + 1], gather_seq(kc, bt[b], n), gather_seq(vc, bt[b], n), 0.15)
        torch.testing.assert_close(out[b].double(), ro[0], atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(lse[b].double(), rl[0], atol=2e-6, rtol=2e-6)


def test_block_sparse_triton_nothing_selected():
    kp = torch.randn(3, 8, 2, 16)
    q = torch.randn(2, 2, 16)
    with poisoned_outputs():
        out, lse = block_sparse_decode_attention_triton(q, kp, kp, torch.empty(2, 2, 0, dtype=torch.int32), 0.2)
    assert (out == 0).all() and torch.isneginf(lse).all()


# ----------------------------------------------------------------------------- merge
def test_merge_triton():
    k, v, q = torch.randn(30, 2, 72), torch.randn(30, 2, 72), torch.randn(1, 6, 72)
    full_o, full_l = dense_attention_f64(q, k, v, 0.1)
    a = [t.float() for t in dense_attention_f64(q, k[:11], v[:11], 0.1)]
    b = [t.float() for t in dense_attention_f64(q, k[11:], v[11:], 0.1)]
    b[1][0, 0] = float("-inf")  # an empty partial on one head
    with poisoned_outputs():
        out, lse = merge_attention_triton(a[0], a[1], b[0], b[1])
    ro, rl = merge_attention_ref(a[0], a[1], b[0], b[1])
    torch.testing.assert_close(out, ro, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, rl, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[0, 1:].double(), full_o[0, 1:], atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- KIVI
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["k", "v"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(2, 36, 1, 72), (1, 1, 1, 2)])
def test_quant_triton_bit_exact(dtype, kind, bits, shape):
    x = (torch.randn(*shape) * 2).to(dtype)
    ref = quantize_kv_ref(x, kind, bits)
    with poisoned_outputs():
        got = quantize_kv_triton(x, kind, bits)
        deq = dequantize_kv_triton(got)
    assert torch.equal(got.data, ref.data)
    torch.testing.assert_close(got.scale, ref.scale, atol=0, rtol=0)
    torch.testing.assert_close(got.zero, ref.zero, atol=0, rtol=0)
    torch.testing.assert_close(deq, dequantize_kv_ref(ref), atol=0, rtol=0)
    sc = ref.scale.repeat_interleave(32, 1)[:, :shape[1]] if kind == "k" else \
        ref.scale.repeat_interleave(32, 3)[..., :shape[3]]
    assert ((deq.double() - x.double()).abs() <= sc.double() / 2 + 1e-6).all()


@pytest.mark.parametrize("kind", ["k", "v"])
def test_quant_triton_fp16_metadata_bit_exact(kind):
    x = torch.randn(2, 72, 2, 72) * 2
    ref = quantize_kv_ref(x, kind, 4, 64, meta_dtype=torch.float16)
    with poisoned_outputs():
        got = quantize_kv_triton(x, kind, 4, 64, meta_dtype=torch.float16)
        deq = dequantize_kv_triton(got)
    assert got.scale.dtype == got.zero.dtype == torch.float16
    assert torch.equal(got.data, ref.data)
    assert torch.equal(got.scale, ref.scale) and torch.equal(got.zero, ref.zero)
    torch.testing.assert_close(deq, dequantize_kv_ref(ref), atol=0, rtol=0)


# ----------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("Hq,Hkv,D", [(4, 4, 16), (9, 3, 72), (8, 2, 64)])
def test_scoring_triton(Hq, Hkv, D):
    g = torch.Generator().manual_seed(0)
    NB = 70
    k = torch.randn(NB, 8, Hkv, D, generator=g)
    q = torch.randn(2, Hq, D, generator=g)
    cand = torch.randint(0, NB, (2, 67), generator=g, dtype=torch.int32)
    cand[1, 60:] = -1
    kmin, kmax = block_minmax(k)
    reprs = k.mean(1)
    with poisoned_outputs():
        s_inf = score_blocks_triton(q, reprs, None, cand, quest=False)
        s_q = score_blocks_triton(q, kmin, kmax, cand, quest=True)
    torch.testing.assert_close(s_inf, score_blocks_infllm_ref(q, reprs, cand), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(s_q, score_blocks_quest_ref(q, kmin, kmax, cand), atol=1e-4, rtol=1e-5)
    # Quest bound >= true max q.k in each page
    kk = k.repeat_interleave(Hq // Hkv, 2)[cand[0].long()]  # (C, 8, Hq, D)
    true = torch.einsum("hd,cthd->hct", q[0].double(), kk.double()).amax(-1)
    assert (s_q[0].double() >= true - 1e-4).all()


# ----------------------------------------------------------------------------- PKM
@pytest.mark.parametrize("T,H,Dk,n,k", [(3, 2, 16, 32, 4), (2, 1, 10, 24, 5), (1, 4, 8, 8, 1)])
def test_pkm_triton(T, H, Dk, n, k):
    q, keys = torch.randn(T, H, Dk), torch.randn(H, 2, n, Dk // 2)
    with poisoned_outputs():
        idx, w = pkm_topk_triton(q, keys, k)
    ridx, rw = pkm_topk_ref(q, keys, k)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(w, rw, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- embedding bag
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,K", [(576, 5), (7, 17)])
def test_embedding_bag_triton(dtype, E, K):
    table = torch.randn(64, E).to(dtype)
    idx = torch.randint(0, 64, (3, K))
    idx[:, 1] = idx[:, 0]
    w = torch.rand(3, K)
    ref = embedding_bag_ref(table, idx, w, out_dtype=torch.float64)
    with poisoned_outputs():
        out = embedding_bag_triton(table, idx, w, out_dtype=torch.float32)
        lowp = embedding_bag_triton(table, idx, w)
        parts = [embedding_bag_triton(table, idx, w, out_dtype=torch.float32, c0=a, c1=b)
                 for a, b in [(0, 1), (1, E // 2), (E // 2, E)]]
        unweighted = embedding_bag_triton(table, idx, None, out_dtype=torch.float32)
    absum = embedding_bag_ref(table.abs(), idx, w, out_dtype=torch.float64).max().item()
    assert (out.double() - ref).abs().max().item() <= K * torch.finfo(torch.float32).eps * absum
    assert lowp.dtype == dtype
    assert (lowp.double() - ref).abs().max().item() <= torch.finfo(dtype).eps * ref.abs().max().item() + 1e-5
    torch.testing.assert_close(torch.cat(parts, 1), out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(unweighted.double(), embedding_bag_ref(table, idx, None, out_dtype=torch.float64),
                               atol=1e-4, rtol=1e-5)


def test_embedding_bag_triton_int8_scales():
    from memserve.kernels import quantize_rows_int8

    table = torch.randn(64, 40) * torch.rand(64, 1)
    q, s = quantize_rows_int8(table)
    idx = torch.randint(0, 64, (3, 9))
    idx[:, 1] = idx[:, 0]
    w = torch.rand(3, 9)
    ref = embedding_bag_ref(q, idx, w, out_dtype=torch.float64, scales=s)
    with poisoned_outputs():
        out = embedding_bag_triton(q, idx, w, scales=s)
        parts = [embedding_bag_triton(q, idx, w, c0=a, c1=b, scales=s) for a, b in [(0, 13), (13, 40)]]
    assert out.dtype == torch.float32
    absum = embedding_bag_ref(q.abs(), idx, w, out_dtype=torch.float64, scales=s).max().item()
    assert (out.double() - ref).abs().max().item() <= 2 * 9 * torch.finfo(torch.float32).eps * absum
    torch.testing.assert_close(torch.cat(parts, 1), out, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- KV memory (ragged batches)
def test_kv_memory_decode_triton():
    from memserve.kernels.kv_memory_decode import (
        kv_memory_decode_attention_ref,
        kv_memory_decode_attention_triton,
    )
    from test_kv_memory_kernels import ragged_memory_batch

    args = ragged_memory_batch(hq=9, hkv=3, d=24)
    with poisoned_outputs():
        out, lse, rec = kv_memory_decode_attention_triton(*args, scale=0.3, tile=8)
    ro, rl, rr = kv_memory_decode_attention_ref(*args, scale=0.3)
    torch.testing.assert_close(out.double(), ro, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), rl, rtol=1e-5, atol=1e-5)
    for a, b in zip(rec, rr):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_kv_memory_chunk_triton():
    """Prefill-chunk attention over [centroids | blocks (per KV head, per query head) | far | local], biases
    broadcast, strided segments, queries not a multiple of the row tile; fp32 against float64."""
    from memserve.kernels.kv_memory_chunk import (
        kv_memory_chunk_attention_ref,
        kv_memory_chunk_attention_triton,
    )
    from test_kv_memory_kernels import memory_chunk

    for per_head, t in ((False, 5), (True, 19)):
        q_far, q_loc, segs, n_rec = memory_chunk(seed=1, t=t, hq=9, hkv=3, d=24, per_head_blocks=per_head)
        with poisoned_outputs():
            out, rec = kv_memory_chunk_attention_triton(q_far, q_loc, segs, n_rec, scale=0.3, block_t=16, tile=16)
        ro, rr = kv_memory_chunk_attention_ref(q_far, q_loc, segs, n_rec, scale=0.3)
        torch.testing.assert_close(out.double(), ro, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rec.double(), rr, rtol=1e-5, atol=1e-5)


def test_score_block_reprs_triton():
    from memserve.kernels.block_scoring import score_block_reprs_ref, score_block_reprs_triton

    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 9, 24, generator=g)
    for mode, R in (("mean", 1), ("max", 4), ("quest", 2)):
        reprs = [torch.randn(3, 24, nb + 3, R, generator=g)[:, :, 1 : 1 + nb] for nb in (5, 1, 40)]
        if mode == "quest":
            reprs = [torch.stack((r.amin(-1), r.amax(-1)), -1) for r in reprs]
        for a, b in zip(score_block_reprs_triton(q, reprs, mode), score_block_reprs_ref(q, reprs, mode)):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_score_blocks_exact_triton():
    """Exact block scores on the codes: int4 / int8, a short last token group, head dim 24, GQA 3."""
    from memserve.kernels.block_scoring_exact import score_blocks_exact_ref, score_blocks_exact_triton

    g = torch.Generator().manual_seed(3)
    for bits, bs, grp in ((4, 32, 16), (8, 24, 16), (4, 8, 8)):
        kq = quantize_kv_ref(torch.randn(5, bs, 3, 24, generator=g) * 2, "k", bits, grp, meta_dtype=torch.float16)
        q = torch.randn(9, 24, generator=g)
        torch.testing.assert_close(score_blocks_exact_triton(q, kq).double(), score_blocks_exact_ref(q, kq),
                                   rtol=1e-5, atol=1e-5)
