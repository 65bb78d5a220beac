"""Product-key memory top-k (Lample et al. 2019, "Large Memory Layers with Product Keys").

    pkm_topk(q (T, H, Dk), keys (H, 2, n_keys, Dk // 2), k) -> (indices (T, H*k) int64, weights (T, H*k) fp32)

Per head the query splits into halves; each half scores its own sub-key set; top-k per half; the
k x k cartesian sums contain the exact top-k of all n_keys^2 products (a product key's score is a
sum of its halves' scores); final top-k; softmax over the k scores in fp32; flat slot index
`i1 * n_keys + i2`. Heads are concatenated head-major: columns [h*k, (h+1)*k) belong to head h.

    pkm_topk_ref    brute force over all n_keys^2 sums in float64 (tests; small n_keys only)
    pkm_topk_torch  two-stage top-k in torch (the CPU fallback, and the peer in bench/memory_layers.py)
    pkm_topk_cpu    sub-key scores by torch's matmul, then one C++ call (kernels/memory_cpu.cpp): heap top-k
                    per half, frontier top-k of the k x k sums, softmax (CPU path where the extension builds)
    pkm_topk_triton sub-key scores by one batched matmul (cuBLAS is the right tool for a GEMM),
                    then Triton programs over tiles of (token, head) rows for top-k / cartesian /
                    top-k / softmax, using score|index packed into int64 keys for tl.topk; any
                    n_keys and knn (masked up to powers of two).
"""

import torch

from ._common import check, lazy_jit, tl, triton, use_triton
from .memory_cpu import extension_for

__all__ = ["pkm_topk", "pkm_topk_cpu", "pkm_topk_ref", "pkm_topk_torch", "pkm_topk_triton"]


def _check(q, keys, k):
    check(q.dim() == 3, f"q must be (T, H, Dk), got {tuple(q.shape)}")
    check(keys.dim() == 4 and keys.shape[1] == 2, f"keys must be (H, 2, n_keys, Dk//2), got {tuple(keys.shape)}")
    T, H, Dk = q.shape
    check(keys.shape[0] == H and keys.shape[3] * 2 == Dk, "keys do not match q's heads / half dim")
    check(1 <= k <= keys.shape[2], f"k={k} must be in [1, n_keys={keys.shape[2]}]")


def _half_scores(q, keys, dtype):
    T, H, Dk = q.shape
    half = Dk // 2
    qh = q.to(dtype).view(T, H, 2, half).permute(1, 2, 0, 3)  # (H, 2, T, half)
    return torch.matmul(qh, keys.to(dtype).transpose(-1, -2))  # (H, 2, T, n_keys)


def pkm_topk_ref(q, keys, k):
    _check(q, keys, k)
    T, H, _ = q.shape
    n = keys.shape[2]
    s = _half_scores(q, keys, torch.float64)  # (H, 2, T, n)
    full = s[:, 0, :, :, None] + s[:, 1, :, None, :]  # (H, T, n, n) every product key
    best, flat = full.reshape(H, T, n * n).topk(k, dim=-1)  # flat = i1 * n + i2
    w = torch.softmax(best, dim=-1)
    return flat.permute(1, 0, 2).reshape(T, H * k), w.float().permute(1, 0, 2).reshape(T, H * k)


def pkm_topk_torch(q, keys, k):
    _check(q, keys, k)
    T, H, _ = q.shape
    n = keys.shape[2]
    s = _half_scores(q, keys, torch.float32)  # (H, 2, T, n)
    v, i = s.topk(k, dim=-1)  # (H, 2, T, k)
    cart = v[:, 0, :, :, None] + v[:, 1, :, None, :]  # (H, T, k, k)
    best, pos = cart.reshape(H, T, k * k).topk(k, dim=-1)  # (H, T, k)
    i1 = torch.gather(i[:, 0], 2, pos // k)
    i2 = torch.gather(i[:, 1], 2, pos % k)
    flat = i1 * n + i2  # int64
    w = torch.softmax(best, dim=-1)
    return flat.permute(1, 0, 2).reshape(T, H * k), w.permute(1, 0, 2).reshape(T, H * k)


def _ordered(x):
    """fp32 -> int32 with the same order (flip the magnitude bits of negatives); self-inverse."""
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


def _unordered(b):
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


def _pkm_select_kernel(s_ptr, idx_ptr, w_ptr, T, H, N, k,
                       N_P2: tl.constexpr, K_P2: tl.constexpr, ROWS: tl.constexpr):
    # program = ROWS consecutive (token, head) rows r = t * H + h; s (H, 2, T, N) fp32 contiguous;
    # outputs (T, H*k), row r's k columns at r * k. Several rows per program: tl.topk works along the
    # last dim of a 2D tile, so a decode step's few tokens x heads take one program instead of T*H
    # (and Triton's interpreter, which runs programs one by one, is ROWS times faster).
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rm = r < T * H
    t = r // H
    h = r % H
    n = tl.arange(0, N_P2)
    m2 = rm[:, None] & (n < N)[None, :]
    base1 = ((h * 2 + 0) * T + t) * N
    base2 = ((h * 2 + 1) * T + t) * N
    s1 = tl.load(s_ptr + base1[:, None] + n[None, :], mask=m2, other=float("-inf"))  # (ROWS, N_P2)
    s2 = tl.load(s_ptr + base2[:, None] + n[None, :], mask=m2, other=float("-inf"))
    # order-preserving int32 image of fp32 packed above the index: one topk yields (score, index)
    nn = n.to(tl.int64)[None, :]
    p1 = tl.topk((_ordered(s1).to(tl.int64) << 32) | nn, K_P2)  # (ROWS, K_P2) descending
    p2 = tl.topk((_ordered(s2).to(tl.int64) << 32) | nn, K_P2)
    kk = tl.arange(0, K_P2)
    km = (kk < k)[None, :]  # k need not be a power of two
    c1 = tl.where(km, _unordered((p1 >> 32).to(tl.int32)), float("-inf"))
    c2 = tl.where(km, _unordered((p2 >> 32).to(tl.int32)), float("-inf"))
    i1 = p1 & 0xFFFFFFFF
    i2 = p2 & 0xFFFFFFFF
    cart = c1[:, :, None] + c2[:, None, :]  # (ROWS, K_P2, K_P2)
    flat = i1[:, :, None] * N + i2[:, None, :]  # < 2^31 for n_keys <= 46340
    packed = tl.reshape((_ordered(cart).to(tl.int64) << 32) | flat, [ROWS, K_P2 * K_P2])
    top = tl.topk(packed, K_P2)  # (ROWS, K_P2)
    best = tl.where(km, _unordered((top >> 32).to(tl.int32)), float("-inf"))
    e = tl.exp(best - tl.max(best, axis=1)[:, None])
    w = e / tl.sum(e, axis=1)[:, None]
    off = r[:, None] * k + kk[None, :]
    om = rm[:, None] & km
    tl.store(idx_ptr + off, top & 0xFFFFFFFF, mask=om)
    tl.store(w_ptr + off, w, mask=om)


_select_jit = lazy_jit(_pkm_select_kernel)

# Elements of the (ROWS, K_P2, K_P2) cartesian tile one program holds: 4096 int64 keys (32 KB) keeps
# a program's working set in registers/shared memory on a GPU for knn <= 64 (ROWS = 1 at knn 64).
_TILE_ELEMS = 4096


def pkm_topk_triton(q, keys, k):
    _check(q, keys, k)
    T, H, _ = q.shape
    n = keys.shape[2]
    check(n * n < 2**31, "n_keys too large for 32-bit packed flat indices")
    s = _half_scores(q, keys, torch.float32).contiguous()  # (H, 2, T, n)
    idx = torch.empty(T, H * k, dtype=torch.int64, device=q.device)
    w = torch.empty(T, H * k, dtype=torch.float32, device=q.device)
    if T == 0:
        return idx, w
    K_P2 = max(2, triton.next_power_of_2(k))
    N_P2 = max(K_P2, triton.next_power_of_2(n))  # tl.topk needs k <= the dim (n_keys = 1)
    rows = max(1, min(triton.next_power_of_2(T * H), _TILE_ELEMS // (K_P2 * K_P2), _TILE_ELEMS // N_P2))
    _select_jit()[(triton.cdiv(T * H, rows),)](s, idx, w, T, H, n, k, N_P2=N_P2, K_P2=K_P2, ROWS=rows)
    return idx, w


def pkm_topk_cpu(q, keys, k, ext=None):
    """The C++ selection over torch's half scores (the same fp32 scores and sums as pkm_topk_torch)."""
    _check(q, keys, k)
    ext = ext or extension_for(q)
    check(ext is not None, "C++ memory kernels unavailable (kernels/memory_cpu.py build_error())")
    idx, w = ext.pkm_select(_half_scores(q, keys, torch.float32), k)
    return idx, w


def pkm_topk(q, keys, k):
    """(indices (T, H*k) int64, weights (T, H*k) fp32). CUDA -> Triton; CPU -> C++ where it builds, else torch."""
    if use_triton(q, keys):
        return pkm_topk_triton(q, keys, k)
    ext = extension_for(q)
    if ext is not None:
        return pkm_topk_cpu(q, keys, k, ext)
    return pkm_topk_torch(q, keys, k)
