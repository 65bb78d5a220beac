"""Exact merge of two partial attentions over disjoint key sets via their log-sum-exps.

    out = (out_a * e^{lse_a} + out_b * e^{lse_b}) / (e^{lse_a} + e^{lse_b}),  lse = log(e^{lse_a} + e^{lse_b})
Shapes: out_* (..., H, D), lse_* (..., H) fp32. A partial over an empty key set has lse = -inf
(and any out); merging two empty partials gives out = 0, lse = -inf.
"""


import torch

from ._common import check, lazy_jit, tl, triton, use_triton

__all__ = ["merge_attention", "merge_attention_ref", "merge_attention_torch", "merge_attention_triton"]


def _check(out_a, lse_a, out_b, lse_b):
    check(out_a.shape == out_b.shape and lse_a.shape == lse_b.shape, "partials must have equal shapes")
    check(out_a.shape[:-1] == lse_a.shape, f"lse {tuple(lse_a.shape)} must be out {tuple(out_a.shape)} minus D")


def merge_attention_ref(out_a, lse_a, out_b, lse_b):
    _check(out_a, lse_a, out_b, lse_b)
    lse = torch.logaddexp(lse_a.double(), lse_b.double())
    wa = torch.exp(lse_a.double() - lse).nan_to_num(0.0)  # both empty: -inf - -inf = nan -> weight 0
    wb = torch.exp(lse_b.double() - lse).nan_to_num(0.0)
    out = out_a.double() * wa[..., None] + out_b.double() * wb[..., None]
    return out.to(out_a.dtype), lse.float()


def merge_attention_torch(out_a, lse_a, out_b, lse_b):
    _check(out_a, lse_a, out_b, lse_b)
    la, lb = lse_a.float(), lse_b.float()
    m = torch.maximum(la, lb)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # keeps exp() finite when both are -inf
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    den = wa + wb
    out = (out_a.float() * wa[..., None] + out_b.float() * wb[..., None]) / den.clamp_min(1e-30)[..., None]
    return out.to(out_a.dtype), m + torch.log(den)


def _merge_kernel(oa_ptr, la_ptr, ob_ptr, lb_ptr, o_ptr, l_ptr, R, D,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program per BLOCK_R rows of the (R, D) view; all tensors contiguous
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    la = tl.load(la_ptr + rows, mask=rmask, other=float("-inf"))
    lb = tl.load(lb_ptr + rows, mask=rmask, other=float("-inf"))
    m = tl.maximum(la, lb)
    m = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp(la - m)
    wb = tl.exp(lb - m)
    den = wa + wb
    inv = 1.0 / tl.maximum(den, 1e-30)
    offs = rows[:, None] * D + cols[None, :]
    msk = rmask[:, None] & (cols[None, :] < D)
    oa = tl.load(oa_ptr + offs, mask=msk, other=0.0).to(tl.float32)
    ob = tl.load(ob_ptr + offs, mask=msk, other=0.0).to(tl.float32)
    o = (oa * (wa * inv)[:, None] + ob * (wb * inv)[:, None])
    tl.store(o_ptr + offs, o.to(o_ptr.dtype.element_ty), mask=msk)
    tl.store(l_ptr + rows, m + tl.log(den), mask=rmask)


_merge_jit = lazy_jit(_merge_kernel)


def merge_attention_triton(out_a, lse_a, out_b, lse_b):
    _check(out_a, lse_a, out_b, lse_b)
    check(lse_a.dtype == lse_b.dtype == torch.float32, "lse must be fp32")
    D = out_a.shape[-1]
    oa, ob = out_a.contiguous(), out_b.contiguous()
    la, lb = lse_a.contiguous(), lse_b.contiguous()
    out = torch.empty_like(oa)
    lse = torch.empty_like(la)
    R = la.numel()
    BLOCK_R = 16
    BLOCK_D = triton.next_power_of_2(D)
    _merge_jit()[(triton.cdiv(R, BLOCK_R),)](oa, la, ob, lb, out, lse, R, D, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
    return out, lse


def merge_attention(out_a, lse_a, out_b, lse_b):
    """(out, lse) of the union of two disjoint key sets. CUDA -> Triton, else torch."""
    if use_triton(out_a, out_b):
        return merge_attention_triton(out_a, lse_a, out_b, lse_b)
    return merge_attention_torch(out_a, lse_a, out_b, lse_b)
