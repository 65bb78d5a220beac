"""Weighted embedding bag (the PKM / Memory+ value lookup), fp32 accumulation.

    embedding_bag(table (N, E), indices (T, K) int64, weights (T, K) | None) -> (T, E) table dtype
    embedding_bag_columns(table, indices, weights, c0, c1) -> (T, c1 - c0): columns [c0, c1) only

Duplicate indices add up. The column variant is what a memory shard computes when the value table
is sharded by embedding dimension (Memory Layers at Scale): every shard receives all (index, weight)
pairs and returns its slice; slices concatenate to the full bag. A shard that holds only its
columns as an (N, c1 - c0) table calls `embedding_bag` on it; `embedding_bag_columns` reads the
slice of a full table without copying it.

    embedding_bag_ref     gather + float64 weighted sum (tests)
    embedding_bag_torch   F.embedding_bag for fp32 contiguous tables; chunked gather + fp32 bmm otherwise
    embedding_bag_triton  one program per (token, column tile), loop over the K rows, fp32 accumulator
"""

import torch
import torch.nn.functional as F

from ._common import check, lazy_jit, tl, triton, use_triton

__all__ = [
    "embedding_bag",
    "embedding_bag_columns",
    "embedding_bag_ref",
    "embedding_bag_torch",
    "embedding_bag_triton",
    "advise_hugepages",
    "empty_table",
]


def _check(table, indices, weights):
    check(table.dim() == 2, f"table must be (N, E), got {tuple(table.shape)}")
    check(indices.dim() == 2 and indices.dtype in (torch.int64, torch.int32), "indices must be (T, K) int")
    check(weights is None or weights.shape == indices.shape, "weights must match indices (T, K)")
    check(table.stride(1) == 1, "table rows must be contiguous (column stride 1)")


def embedding_bag_ref(table, indices, weights=None, out_dtype=None):
    _check(table, indices, weights)
    rows = table[indices.long()].double()  # (T, K, E)
    w = torch.ones(indices.shape, dtype=torch.float64) if weights is None else weights.double()
    return (rows * w.to(rows.device)[..., None]).sum(1).to(out_dtype or table.dtype)


# Rows gathered per chunk on the fallback path: 8 MB of fp32 temporaries stays cache-friendly.
_CHUNK_ELEMS = 2 * 1024 * 1024


def embedding_bag_torch(table, indices, weights=None, out_dtype=None):
    _check(table, indices, weights)
    T, K = indices.shape
    E = table.shape[1]
    out_dtype = out_dtype or table.dtype
    if table.dtype == torch.float32 and table.is_contiguous():
        # fbgemm-backed CPU kernel: per-token rows are summed straight into the output (no gathered copy)
        w = None if weights is None else weights.float().contiguous()
        return F.embedding_bag(indices.long(), table, mode="sum", per_sample_weights=w).to(out_dtype)
    out = torch.empty(T, E, dtype=out_dtype, device=table.device)
    step = max(1, _CHUNK_ELEMS // max(1, K * E))
    for a in range(0, T, step):  # chunks of tokens, never per token
        idx = indices[a:a + step].long()
        rows = table.index_select(0, idx.reshape(-1)).view(idx.shape[0], K, E).float()  # (t, K, E)
        w = torch.ones(idx.shape, device=table.device) if weights is None else weights[a:a + step].float()
        out[a:a + step] = torch.bmm(w.unsqueeze(1), rows).squeeze(1).to(out_dtype)
    return out


def _bag_kernel(t_ptr, i_ptr, w_ptr, o_ptr, K, E, c0, stn, sib, sik, swb, swk, sob,
                HAS_W: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    # program (token, column tile); columns are relative to c0 (column-slice variant when c0 > 0 or
    # E < table width)
    tok = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    cm = cols < E
    acc = tl.zeros([BLOCK_E], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < K
        idx = tl.load(i_ptr + tok * sib + kk * sik, mask=km, other=0).to(tl.int64)
        if HAS_W:
            w = tl.load(w_ptr + tok * swb + kk * swk, mask=km, other=0.0).to(tl.float32)
        else:
            w = tl.where(km, 1.0, 0.0)
        rows = tl.load(t_ptr + idx[:, None] * stn + (c0 + cols)[None, :], mask=km[:, None] & cm[None, :],
                       other=0.0).to(tl.float32)  # (BLOCK_K, BLOCK_E)
        acc += tl.sum(rows * w[:, None], axis=0)
    tl.store(o_ptr + tok * sob + cols, acc.to(o_ptr.dtype.element_ty), mask=cm)


_bag_jit = lazy_jit(_bag_kernel)


def embedding_bag_triton(table, indices, weights=None, out_dtype=None, c0=0, c1=None):
    _check(table, indices, weights)
    c1 = table.shape[1] if c1 is None else c1
    check(0 <= c0 < c1 <= table.shape[1], f"bad column slice [{c0}, {c1})")
    T, K = indices.shape
    E = c1 - c0
    out = torch.empty(T, E, dtype=out_dtype or table.dtype, device=table.device)
    if T == 0:
        return out
    BLOCK_E = min(256, triton.next_power_of_2(E))
    w = weights if weights is not None else indices  # dummy pointer when unweighted
    _bag_jit()[(T, triton.cdiv(E, BLOCK_E))](
        table, indices, w, out, K, E, c0, table.stride(0), *indices.stride(), *w.stride(), out.stride(0),
        HAS_W=weights is not None, BLOCK_E=BLOCK_E, BLOCK_K=min(16, max(2, triton.next_power_of_2(K))))
    return out


def embedding_bag(table, indices, weights=None, out_dtype=None):
    """(T, E) weighted sum of rows, fp32 accumulation. CUDA -> Triton, else torch."""
    if use_triton(table, indices):
        return embedding_bag_triton(table, indices, weights, out_dtype)
    return embedding_bag_torch(table, indices, weights, out_dtype)


def embedding_bag_columns(table, indices, weights, c0, c1, out_dtype=None):
    """(T, c1 - c0): the bag restricted to columns [c0, c1) of a full table (no table copy)."""
    check(0 <= c0 < c1 <= table.shape[1], f"bad column slice [{c0}, {c1})")
    if use_triton(table, indices):
        return embedding_bag_triton(table, indices, weights, out_dtype, c0, c1)
    # the column view is not contiguous: F.embedding_bag would copy the whole table, the gather path reads rows
    _check(table, indices, weights)
    view = table[:, c0:c1]
    T, K = indices.shape
    out_dtype = out_dtype or table.dtype
    out = torch.empty(T, c1 - c0, dtype=out_dtype, device=table.device)
    step = max(1, _CHUNK_ELEMS // max(1, K * (c1 - c0)))
    for a in range(0, T, step):
        idx = indices[a:a + step].long()
        rows = view.index_select(0, idx.reshape(-1)).view(idx.shape[0], K, c1 - c0).float()
        w = torch.ones(idx.shape, device=table.device) if weights is None else weights[a:a + step].float()
        out[a:a + step] = torch.bmm(w.unsqueeze(1), rows).squeeze(1).to(out_dtype)
    return out


def advise_hugepages(t: torch.Tensor) -> bool:
    """madvise(MADV_HUGEPAGE) over a CPU tensor's memory (Linux, THP in 'madvise' mode). Call it on
    a fresh, untouched allocation (torch.empty of a large table): the pages faulted in afterwards
    are 2 MB pages, so a gather over a multi-GB table stops paying a TLB miss per row. Returns
    whether the advice was given."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or t.device.type != "cpu":
        return False
    huge = 2 << 20
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    a = (start + huge - 1) // huge * huge
    if end - a < huge:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t((end - a) // huge * huge), 14) == 0  # MADV_HUGEPAGE


def empty_table(rows: int, cols: int, dtype=torch.float32) -> torch.Tensor:
    """An uninitialized (rows, cols) value table for embedding bags, backed by transparent huge
    pages where the OS allows it (see `advise_hugepages`; measured in bench/kernels.py)."""
    t = torch.empty(rows, cols, dtype=dtype)
    advise_hugepages(t)
    return t
