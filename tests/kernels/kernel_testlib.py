"""Shared helpers of the kernel tests: independent float64 references, paged-cache builders,
poisoned allocations and error budgets relative to torch's own low-precision error."""

import contextlib
import math

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dense_attention_f64(q, k, v, scale, mask=None):
    """q (Lq, Hq, D), k/v (Lk, Hkv, D) -> out (Lq, Hq, D) f64, lse (Lq, Hq) f64. Independent of kernels/."""
    G = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.einsum("hqk,khd->qhd", torch.exp(s - lse[..., None]), v), lse.transpose(0, 1)


def dense_attention_lowp(q, k, v, scale):
    """The same attention computed by plain torch ops IN the inputs' dtype: torch's own error."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)


def make_paged(lens, Hkv, D, BS, dtype, seed=0, extra_blocks=3):
    """A shuffled block pool holding `lens` tokens per sequence; block-table entries past a
    sequence's end hold junk ids that would crash if read."""
    g = torch.Generator().manual_seed(seed)
    nbs = [(n + BS - 1) // BS for n in lens]
    NB = sum(nbs) + extra_blocks
    kc = torch.randn(NB, BS, Hkv, D, generator=g).to(dtype)
    vc = torch.randn(NB, BS, Hkv, D, generator=g).to(dtype)
    perm = torch.randperm(NB, generator=g)
    bt = torch.full((len(lens), max(nbs) + 2), 10**6, dtype=torch.int32)
    o = 0
    for i, nb in enumerate(nbs):
        bt[i, :nb] = perm[o:o + nb].int()
        o += nb
    return kc, vc, bt, torch.tensor(lens, dtype=torch.int32)


def gather_seq(cache, bt_row, n):
    """(n, Hkv, D) tokens of one sequence of a paged pool."""
    BS = cache.shape[1]
    nb = (n + BS - 1) // BS
    return cache[bt_row[:nb].long()].reshape(nb * BS, *cache.shape[2:])[:n]


@contextlib.contextmanager
def poisoned_outputs():
    """Every torch.empty / empty_like inside the block is filled with NaN (floats) or a sentinel
    (ints), so an element a kernel forgets to write fails the comparison."""
    real_empty, real_like = torch.empty, torch.empty_like

    def poison(t):
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype == torch.uint8:
            t.fill_(0xA5)
        elif t.dtype != torch.bool:
            t.fill_(-777)
        return t

    torch.empty = lambda *a, **k: poison(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(real_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_like


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_within_torch_error(x, ref64, torch_lowp, factor=2.0, floor=None):
    """|x - ref64| <= factor * |torch_lowp - ref64| + floor: the kernel may be as wrong as torch's
    own computation in that dtype, not more. The floor is the unavoidable part: rounding the exact
    result to x.dtype (one ulp of the largest |ref|), at least a few fp32 ulps."""
    assert not torch.isnan(x).any(), "NaN in output (unwritten element?)"
    scale = ref64.abs().max().item() if ref64.numel() else 1.0
    if floor is None:
        floor = max(8 * torch.finfo(torch.float32).eps * max(scale, 1.0), torch.finfo(x.dtype).eps * scale)
    budget = factor * max_err(torch_lowp, ref64) + floor
    err = max_err(x, ref64)
    assert err <= budget, f"error {err:.3g} > budget {budget:.3g} (torch's own error {max_err(torch_lowp, ref64):.3g})"


def inv_sqrt(d):
    return 1.0 / math.sqrt(d)
