"""The KV memory's kernel ops (kv_memory_decode_attention, kv_memory_chunk_attention, score_block_reprs): torch paths against
float64 references on ragged batches (the Triton paths run in test_triton_cases.py, interpreter)."""

import torch
from memserve.kernels.block_scoring import score_block_reprs_ref, score_block_reprs_torch
from memserve.kernels.kv_memory_chunk import kv_memory_chunk_attention_ref, kv_memory_chunk_attention_torch
from memserve.kernels.kv_memory_decode import kv_memory_decode_attention_ref, kv_memory_decode_attention_torch


def ragged_memory_batch(seed=0, hq=6, hkv=2, d=16, shapes=((40, 16, 10), (7, 0, 3), (64, 32, 0)), cap_extra=5):
    """B sequences of (W, m, f) as strided views of bigger buffers (like the memory's growable rows)."""
    g = torch.Generator().manual_seed(seed)
    keys, values, pads, ms, fs = [], [], [], [], []
    for w, m, f in shapes:
        kb = torch.randn(2, hkv, d, w + cap_extra, generator=g)[..., 2 : 2 + w]
        vb = torch.randn(hkv, w + cap_extra, d, generator=g)[:, 1 : 1 + w]
        pad = None
        if m:
            pad = torch.zeros(hkv, m)
            pad[0, : m // 2] = float("-inf")  # head 0: a free slot
        keys.append(kb), values.append(vb), pads.append(pad), ms.append(m), fs.append(f)
    q_far = torch.randn(len(shapes), hq, d, generator=g)
    q_loc = torch.randn(len(shapes), hq, d, generator=g)
    return q_far, q_loc, keys, values, ms, fs, pads


def test_kv_memory_decode_torch_matches_float64_reference():
    args = ragged_memory_batch()
    out, lse, rec = kv_memory_decode_attention_torch(*args, scale=0.25, return_lse=True)
    ro, rl, rr = kv_memory_decode_attention_ref(*args, scale=0.25)
    torch.testing.assert_close(out.double(), ro, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), rl, rtol=1e-5, atol=1e-5)
    for a, b in zip(rec, rr):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    # received sums to the group size over the window + block mass: a real probability split
    assert float(rr[1].sum()) > 0


def memory_chunk(seed=0, t=5, hq=6, hkv=2, d=16, per_head_blocks=False, dtype=torch.float32):
    """A prefill chunk's segments as the memory builds them, strided views included: [centroids (log-count
    bias, -inf where selected) | selected blocks (padding -inf on one head; per query head or per KV head) |
    far window (banded mask) | local window (causal mask)]."""
    g = torch.Generator().manual_seed(seed)
    grp = hq // hkv

    def kv(n, gk=1):
        k = torch.randn(hkv, gk, d, n + 3, generator=g, dtype=dtype)[..., 1 : 1 + n]
        v = torch.randn(hkv, gk, n + 2, d, generator=g, dtype=dtype)[:, :, 2:]
        return k, v

    nc, m, f, nl = 3, 8, 7, 4 + t
    cent_bias = torch.full((hkv, 1, 1, nc), 4.0)
    cent_bias[0, 0, 0, 1] = float("-inf")
    pad = torch.zeros(hkv, grp if per_head_blocks else 1, 1, m)
    pad[1, 0, 0, -3:] = float("-inf")
    bias_f = torch.zeros(t, f)
    bias_f[0, -2:] = float("-inf")
    bias_l = torch.where(torch.arange(nl)[None] <= torch.arange(t)[:, None] + nl - t, 0.0, float("-inf"))
    segs = [(*kv(nc), cent_bias, False), (*kv(m, grp if per_head_blocks else 1), pad, False),
            (*kv(f), bias_f, False), (*kv(nl), bias_l, True)]
    q_far = torch.randn(t, hq, d, generator=g, dtype=dtype)
    q_loc = torch.randn(t, hq, d, generator=g, dtype=dtype)
    return q_far, q_loc, segs, f + nl


def test_kv_memory_chunk_torch_matches_float64_reference():
    for per_head in (False, True):
        q_far, q_loc, segs, n_rec = memory_chunk(per_head_blocks=per_head)
        out, rec = kv_memory_chunk_attention_torch(q_far, q_loc, segs, n_rec, scale=0.3)
        ro, rr = kv_memory_chunk_attention_ref(q_far, q_loc, segs, n_rec, scale=0.3)
        torch.testing.assert_close(out.double(), ro, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rec.double(), rr, rtol=1e-5, atol=1e-5)
    # one local segment only (before the memory engages), nothing received
    out, rec = kv_memory_chunk_attention_torch(None, q_loc, segs[-1:], 0, scale=0.3)
    ro, _ = kv_memory_chunk_attention_ref(None, q_loc, segs[-1:], 0, scale=0.3)
    torch.testing.assert_close(out.double(), ro, rtol=1e-5, atol=1e-5)
    assert rec.shape == (2, 0)


def test_score_block_reprs_torch_matches_float64_reference():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 6, 16, generator=g)
    for mode, R in (("mean", 1), ("max", 4), ("quest", 2)):
        reprs = [torch.randn(2, 16, nb + 3, R, generator=g)[:, :, 1 : 1 + nb] for nb in (5, 1, 12)]
        if mode == "quest":
            reprs = [torch.stack((r.amin(-1), r.amax(-1)), -1) for r in reprs]
        got = score_block_reprs_torch(q, reprs, mode)
        ref = score_block_reprs_ref(q, reprs, mode)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_score_blocks_exact_torch_matches_float64_reference():
    """Exact block scores computed on int codes (q scaled per token group + q . zero), chunked over blocks,
    against the float64 max over the dequantized keys; a short last group (bs 48, group 32) included."""
    from memserve.kernels.block_scoring_exact import score_blocks_exact_ref, score_blocks_exact_torch
    from memserve.kernels.kv_quant import quantize_kv_ref

    g = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        for bs, grp in ((64, 64), (48, 32), (16, 8)):
            kq = quantize_kv_ref(torch.randn(7, bs, 2, 16, generator=g) * 3 + 1, "k", bits, grp,
                                 meta_dtype=torch.float16)
            q = torch.randn(6, 16, generator=g)
            ref = score_blocks_exact_ref(q, kq)
            torch.testing.assert_close(score_blocks_exact_torch(q, kq, chunk=3).double(), ref, rtol=1e-5, atol=1e-5)
