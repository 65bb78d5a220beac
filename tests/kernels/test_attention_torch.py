"""Torch paths of decode / prefill attention against float64 dense attention."""

import math

import pytest
import torch
from kernel_testlib import dense_attention_f64, gather_seq, make_paged
from memserve.kernels import (
    paged_decode_attention,
    paged_decode_attention_ref,
    prefill_attention,
    prefill_attention_ref,
)
from memserve.kernels.paged_attention import paged_decode_attention_torch
from memserve.kernels.prefill_attention import prefill_attention_torch


@pytest.mark.parametrize("impl", [paged_decode_attention_torch, paged_decode_attention_ref, paged_decode_attention])
@pytest.mark.parametrize("lens,Hq,Hkv,D,BS", [
    ([1], 4, 4, 16, 16),
    ([17, 1, 50], 9, 3, 64, 16),
    ([33, 8, 100, 64], 8, 2, 72, 8),
])
def test_paged_decode_matches_dense(impl, lens, Hq, Hkv, D, BS):
    kc, vc, bt, sl = make_paged(lens, Hkv, D, BS, torch.float32)
    q = torch.randn(len(lens), Hq, D)
    scale = 1 / math.sqrt(D)
    out, lse = impl(q, kc, vc, bt, sl, scale)
    assert out.shape == q.shape and lse.shape == (len(lens), Hq) and lse.dtype == torch.float32
    for b, n in enumerate(lens):
        ro, rl = dense_attention_f64(q[b:b + 1], gather_seq(kc, bt[b], n), gather_seq(vc, bt[b], n), scale)
        torch.testing.assert_close(out[b].double(), ro[0], atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse[b].double(), rl[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_decode_low_precision(dtype):
    lens = [40, 7]
    kc, vc, bt, sl = make_paged(lens, 2, 32, 16, dtype)
    q = torch.randn(2, 6, 32).to(dtype)
    out, lse = paged_decode_attention(q, kc, vc, bt, sl, 0.2)
    assert out.dtype == dtype
    for b, n in enumerate(lens):
        ro, _ = dense_attention_f64(q[b:b + 1], gather_seq(kc, bt[b], n), gather_seq(vc, bt[b], n), 0.2)
        # fp32 accumulation inside: error is the output rounding of `dtype`
        err = (out[b].double() - ro[0]).abs().max().item()
        assert err <= 2 * torch.finfo(dtype).eps * ro.abs().max().item() + 1e-6


@pytest.mark.parametrize("impl", [prefill_attention_torch, prefill_attention_ref, prefill_attention])
@pytest.mark.parametrize("Hq,Hkv,D", [(9, 3, 64), (4, 4, 72), (8, 2, 16)])
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_varlen_matches_dense(impl, Hq, Hkv, D, causal):
    lq, lk = [5, 1, 7, 16], [5, 9, 20, 16]  # prefix-cached chunks (lq < lk) and full prompts
    q = torch.randn(sum(lq), Hq, D)
    k, v = torch.randn(sum(lk), Hkv, D), torch.randn(sum(lk), Hkv, D)
    cq = torch.tensor([0] + lq).cumsum(0).int()
    ck = torch.tensor([0] + lk).cumsum(0).int()
    out = impl(q, k, v, cq, ck, 0.125, causal)
    for i in range(len(lq)):
        qi, ki, vi = q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]]
        mask = None
        if causal:  # bottom-right: query r is absolute position lk - lq + r
            mask = torch.arange(lk[i])[None, :] <= (torch.arange(lq[i]) + lk[i] - lq[i])[:, None]
        ro, _ = dense_attention_f64(qi, ki, vi, 0.125, mask)
        torch.testing.assert_close(out[cq[i]:cq[i + 1]].double(), ro, atol=2e-5, rtol=2e-5)


def test_chunked_prefill_equals_full_prefill():
    T, H, D = 37, 4, 32
    q, k, v = torch.randn(T, H, D), torch.randn(T, 2, D), torch.randn(T, 2, D)
    full = prefill_attention(q, k, v, torch.tensor([0, T]), torch.tensor([0, T]), 0.2)
    pieces = []
    for a, b in [(0, 10), (10, 11), (11, 37)]:
        pieces.append(prefill_attention(q[a:b], k[:b], v[:b], torch.tensor([0, b - a]), torch.tensor([0, b]), 0.2))
    torch.testing.assert_close(torch.cat(pieces), full, atol=1e-5, rtol=1e-5)


def test_decode_equals_last_prefill_row():
    """Paged decode of token t == row t of a full causal prefill (engine consistency)."""
    lens = [29]
    kc, vc, bt, sl = make_paged(lens, 3, 64, 16, torch.float32)
    k, v = gather_seq(kc, bt[0], 29), gather_seq(vc, bt[0], 29)
    q = torch.randn(29, 9, 64)
    full = prefill_attention(q, k, v, torch.tensor([0, 29]), torch.tensor([0, 29]), 0.125)
    out, _ = paged_decode_attention(q[-1:], kc, vc, bt, sl, 0.125)
    torch.testing.assert_close(out[0], full[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("contiguous", [False, True])
def test_paged_decode_long_chunked_and_contiguous_paths(contiguous, monkeypatch):
    """Longer than the chunk size with scattered blocks takes the chunked online-softmax path;
    consecutive blocks take the zero-copy view path."""
    import memserve.kernels.paged_attention as pa

    monkeypatch.setattr(pa, "_CHUNK_TOKENS", 1024)
    lens = [2500, 40]
    kc, vc, bt, sl = make_paged(lens, 3, 16, 16, torch.float32)
    if contiguous:
        bt[0, :157] = torch.arange(157, dtype=torch.int32)
    q = torch.randn(2, 9, 16)
    out, lse = paged_decode_attention_torch(q, kc, vc, bt, sl, 0.25)
    for b, n in enumerate(lens):
        ro, rl = dense_attention_f64(q[b:b + 1], gather_seq(kc, bt[b], n), gather_seq(vc, bt[b], n), 0.25)
        torch.testing.assert_close(out[b].double(), ro[0], atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse[b].double(), rl[0], atol=2e-5, rtol=2e-5)


def test_paged_decode_rejects_empty_sequences():
    kc, vc, bt, sl = make_paged([5, 3], 1, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="seq_len"):
        paged_decode_attention(torch.randn(2, 2, 8), kc, vc, bt, torch.tensor([5, 0], dtype=torch.int32), 0.3)
