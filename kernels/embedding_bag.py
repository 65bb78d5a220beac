"""Weighted embedding bag (the PKM / Memory+ value lookup), fp32 accumulation.

    embedding_bag(table (N, E), indices (T, K) int64, weights (T, K) | None, scales=None) -> (T, E)
    embedding_bag_columns(table, indices, weights, c0, c1, scales=None) -> (T, c1 - c0): columns [c0, c1) only

int8 tables (issue 16): `table` int8 with per-row `scales` (N,) fp32, row r = table[r] * scales[r]
(`quantize_rows_int8` makes them: symmetric, scale = max|row| / 127). The bag dequantizes in the
bag: each (index, weight) pair's weight is multiplied by its row's scale and the int8 row is
accumulated in fp32, so no dequantized row or table is ever materialized (1 byte per element read
instead of 4). The output defaults to fp32 for int8 tables.

Duplicate indices add up. The column variant is what a memory shard computes when the value table
is sharded by embedding dimension (Memory Layers at Scale): every shard receives all (index, weight)
pairs and returns its slice; slices concatenate to the full bag. A shard that holds only its
columns as an (N, c1 - c0) table calls `embedding_bag` on it; `embedding_bag_columns` reads the
slice of a full table without copying it.

    embedding_bag_ref     gather + float64 weighted sum (tests)
    embedding_bag_torch   F.embedding_bag for fp32 contiguous tables; chunked gather + fp32 sums otherwise
    embedding_bag_cpu     one C++ pass per token (kernels/memory_cpu.cpp): rows prefetched, converted in
                          registers (bf16 / fp16 / int8 x scale) and accumulated in fp32, any column range;
                          the CPU path where the extension builds (torch's otherwise)
    embedding_bag_triton  one program per (token, column tile), loop over the K rows, fp32 accumulator
"""

import torch
import torch.nn.functional as F

from ._common import check, lazy_jit, tl, triton, use_triton
from .memory_cpu import extension_for

__all__ = [
    "embedding_bag",
    "embedding_bag_columns",
    "embedding_bag_cpu",
    "embedding_bag_ref",
    "embedding_bag_torch",
    "embedding_bag_triton",
    "quantize_rows_int8",
    "advise_hugepages",
    "empty_table",
]


def _check(table, indices, weights, scales=None):
    check(table.dim() == 2, f"table must be (N, E), got {tuple(table.shape)}")
    check(indices.dim() == 2 and indices.dtype in (torch.int64, torch.int32), "indices must be (T, K) int")
    check(weights is None or weights.shape == indices.shape, "weights must match indices (T, K)")
    check(table.stride(1) == 1, "table rows must be contiguous (column stride 1)")
    check((table.dtype == torch.int8) == (scales is not None),
          f"an int8 table needs per-row scales and only an int8 table takes them (table {table.dtype}, "
          f"scales {'given' if scales is not None else 'None'})")
    check(scales is None or (scales.shape == (table.shape[0],) and scales.is_floating_point()),
          f"scales must be float ({table.shape[0]},), got {None if scales is None else tuple(scales.shape)}")


def _out_dtype(table, out_dtype):
    return out_dtype or (torch.float32 if table.dtype == torch.int8 else table.dtype)


def _scaled_weights(indices, weights, scales):
    """fp32 (T, K) weights with each pair's row scale folded in (int8 tables); `weights` as is otherwise."""
    if scales is None:
        return weights
    s = scales.float()[indices.long()]
    return s if weights is None else weights.float() * s


def quantize_rows_int8(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 (N, E), fp32 scales (N,)): symmetric per-row absmax quantization, row = q * scale.
    An all-zero row gets scale 0 (and codes 0). Works in row chunks, so a big table's fp32 copy is
    never doubled."""
    check(table.dim() == 2 and table.is_floating_point(), "table must be a float (N, E) tensor")
    N, E = table.shape
    q = torch.empty(N, E, dtype=torch.int8)
    scales = torch.empty(N, dtype=torch.float32)
    step = max(1, _CHUNK_ELEMS // max(1, E))
    for a in range(0, N, step):
        x = table[a:a + step].float()
        s = x.abs().amax(1) / 127.0
        scales[a:a + step] = s
        q[a:a + step] = torch.round(x / torch.where(s > 0, s, 1.0)[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def embedding_bag_ref(table, indices, weights=None, out_dtype=None, scales=None):
    _check(table, indices, weights, scales)
    rows = table[indices.long()].double()  # (T, K, E)
    if scales is not None:
        rows = rows * scales.double()[indices.long()][..., None]
    w = torch.ones(indices.shape, dtype=torch.float64) if weights is None else weights.double()
    return (rows * w.to(rows.device)[..., None]).sum(1).to(_out_dtype(table, out_dtype))


# Rows gathered per chunk on the fallback path: 8 MB of fp32 temporaries stays cache-friendly.
_CHUNK_ELEMS = 2 * 1024 * 1024


def embedding_bag_torch(table, indices, weights=None, out_dtype=None, scales=None):
    _check(table, indices, weights, scales)
    out_dtype = _out_dtype(table, out_dtype)
    weights = _scaled_weights(indices, weights, scales)
    if table.dtype == torch.float32 and table.is_contiguous():
        # fbgemm-backed CPU kernel: per-token rows are summed straight into the output (no gathered copy)
        w = None if weights is None else weights.float().contiguous()
        return F.embedding_bag(indices.long(), table, mode="sum", per_sample_weights=w).to(out_dtype)
    return _gather_bag(table, indices, weights, out_dtype)


def _gather_bag(view, indices, weights, out_dtype):
    """Chunks of tokens (never per token): gather the chunk's rows as fp32 (t*K, E), then fbgemm's
    F.embedding_bag sums each token's K rows in order. Not bmm: its K-reduction order depends on E,
    so a column shard's slice would differ in the last bit from the full table's bag; embedding_bag's
    per-column sums do not (measured: int8 rows, T=64, K=128, E=576, 1 thread: 32-39 ms vs bmm 34-42 ms)."""
    T, K = indices.shape
    E = view.shape[1]
    out = torch.empty(T, E, dtype=out_dtype, device=view.device)
    step = max(1, _CHUNK_ELEMS // max(1, K * E))
    for a in range(0, T, step):
        idx = indices[a:a + step].long()
        t = idx.shape[0]
        rows = view.index_select(0, idx.reshape(-1)).float()  # (t*K, E)
        w = None if weights is None else weights[a:a + step].float().contiguous()
        pos = torch.arange(t * K, device=view.device).view(t, K)
        out[a:a + step] = F.embedding_bag(pos, rows, mode="sum", per_sample_weights=w).to(out_dtype)
    return out


def _bag_kernel(t_ptr, i_ptr, w_ptr, s_ptr, o_ptr, K, E, c0, stn, sib, sik, swb, swk, sob,
                HAS_W: tl.constexpr, HAS_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    # program (token, column tile); columns are relative to c0 (column-slice variant when c0 > 0 or
    # E < table width). HAS_S: int8 rows, each pair's weight times its row's scale (dequant in the bag)
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
        if HAS_S:
            w = w * tl.load(s_ptr + idx, mask=km, other=0.0).to(tl.float32)
        rows = tl.load(t_ptr + idx[:, None] * stn + (c0 + cols)[None, :], mask=km[:, None] & cm[None, :],
                       other=0.0).to(tl.float32)  # (BLOCK_K, BLOCK_E)
        acc += tl.sum(rows * w[:, None], axis=0)
    tl.store(o_ptr + tok * sob + cols, acc.to(o_ptr.dtype.element_ty), mask=cm)


_bag_jit = lazy_jit(_bag_kernel)


def embedding_bag_triton(table, indices, weights=None, out_dtype=None, c0=0, c1=None, scales=None):
    _check(table, indices, weights, scales)
    c1 = table.shape[1] if c1 is None else c1
    check(0 <= c0 < c1 <= table.shape[1], f"bad column slice [{c0}, {c1})")
    T, K = indices.shape
    E = c1 - c0
    out = torch.empty(T, E, dtype=_out_dtype(table, out_dtype), device=table.device)
    if T == 0:
        return out
    BLOCK_E = min(256, triton.next_power_of_2(E))
    w = weights if weights is not None else indices  # dummy pointer when unweighted
    s = scales.contiguous() if scales is not None else indices  # dummy pointer without scales
    _bag_jit()[(T, triton.cdiv(E, BLOCK_E))](
        table, indices, w, s, out, K, E, c0, table.stride(0), *indices.stride(), *w.stride(), out.stride(0),
        HAS_W=weights is not None, HAS_S=scales is not None, BLOCK_E=BLOCK_E,
        BLOCK_K=min(16, max(2, triton.next_power_of_2(K))))
    return out


def embedding_bag_cpu(table, indices, weights=None, out_dtype=None, c0=0, c1=None, scales=None, ext=None):
    """The C++ bag (columns [c0, c1) of `table`; the whole row by default)."""
    _check(table, indices, weights, scales)
    ext = ext or extension_for(table)
    check(ext is not None, "C++ memory kernels unavailable (kernels/memory_cpu.py build_error())")
    c1 = table.shape[1] if c1 is None else c1
    check(0 <= c0 < c1 <= table.shape[1], f"bad column slice [{c0}, {c1})")
    out = ext.bag(table, indices, weights, scales, c0, c1)
    od = _out_dtype(table, out_dtype)
    return out if od == torch.float32 else out.to(od)


def embedding_bag(table, indices, weights=None, out_dtype=None, scales=None):
    """(T, E) weighted sum of rows, fp32 accumulation (int8 tables: rows times `scales`). CUDA -> Triton;
    CPU -> C++ where it builds, else torch."""
    if use_triton(table, indices):
        return embedding_bag_triton(table, indices, weights, out_dtype, scales=scales)
    # every dtype: the C++ bag measured faster than fbgemm's fp32 F.embedding_bag too (bench/memory_layers.py)
    ext = extension_for(table)
    if ext is not None:
        return embedding_bag_cpu(table, indices, weights, out_dtype, scales=scales, ext=ext)
    return embedding_bag_torch(table, indices, weights, out_dtype, scales=scales)


def embedding_bag_columns(table, indices, weights, c0, c1, out_dtype=None, scales=None):
    """(T, c1 - c0): the bag restricted to columns [c0, c1) of a full table (no table copy)."""
    check(0 <= c0 < c1 <= table.shape[1], f"bad column slice [{c0}, {c1})")
    if use_triton(table, indices):
        return embedding_bag_triton(table, indices, weights, out_dtype, c0, c1, scales=scales)
    ext = extension_for(table)
    if ext is not None:
        return embedding_bag_cpu(table, indices, weights, out_dtype, c0, c1, scales=scales, ext=ext)
    # the column view is not contiguous: F.embedding_bag would copy the whole table, the gather path reads rows
    _check(table, indices, weights, scales)
    weights = _scaled_weights(indices, weights, scales)
    return _gather_bag(table[:, c0:c1], indices, weights, _out_dtype(table, out_dtype))


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
    pages where the OS allows it (see `advise_hugepages`; measured in bench/kernel_roofline.py)."""
    t = torch.empty(rows, cols, dtype=dtype)
    advise_hugepages(t)
    return t
