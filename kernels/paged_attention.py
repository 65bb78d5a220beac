"""Paged decode attention: one query token per sequence over a paged KV block pool.

Layouts (the package-wide contract):
    q            (B, Hq, D)               one decode token per sequence
    k_cache      (NB, BS, Hkv, D)         per layer; v_cache the same
    block_tables (B, MAXB) int32          block ids of each sequence, in order
    seq_lens     (B,) int32               number of valid KV tokens per sequence (>= 1)
Returns (out (B, Hq, D) in q.dtype, lse (B, Hq) fp32 natural-log log-sum-exp of the scaled
scores) so that partial attentions over different tiers merge exactly (`merge_attention`).
GQA: Hq = G * Hkv, query head h reads KV head h // G.

Three implementations of the same function:
    paged_decode_attention_ref     obviously-correct torch, one sequence at a time (tests)
    paged_decode_attention_torch   vectorized CPU path (the engine's hot path on CPUs)
    paged_decode_attention_triton  split-K Triton kernel + log-sum-exp merge (CUDA)
`paged_decode_attention` dispatches: CUDA -> Triton, else torch.
"""


import torch

from ._common import check, use_triton

__all__ = [
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "paged_decode_attention_torch",
    "paged_decode_attention_triton",
]


def _check_inputs(q, k_cache, v_cache, block_tables, seq_lens):
    check(q.dim() == 3, f"q must be (B, Hq, D), got {tuple(q.shape)}")
    check(k_cache.dim() == 4, f"k_cache must be (NB, BS, Hkv, D), got {tuple(k_cache.shape)}")
    check(k_cache.shape == v_cache.shape, "k_cache and v_cache shapes differ")
    B, Hq, D = q.shape
    check(k_cache.shape[3] == D, f"head_dim mismatch: q {D}, cache {k_cache.shape[3]}")
    check(Hq % k_cache.shape[2] == 0, f"Hq={Hq} is not a multiple of Hkv={k_cache.shape[2]}")
    check(block_tables.dim() == 2 and block_tables.shape[0] == B, "block_tables must be (B, MAXB)")
    check(seq_lens.shape == (B,), "seq_lens must be (B,)")
    check(not block_tables.dtype.is_floating_point and not seq_lens.dtype.is_floating_point,
          "block_tables / seq_lens must be integer tensors")
    check(q.dtype == k_cache.dtype == v_cache.dtype, "q, k_cache, v_cache must share a dtype")


# ----------------------------------------------------------------------------- reference
def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """Reference: gather each sequence's KV, plain softmax attention in fp32 (or fp64 if given)."""
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens)
    B, Hq, D = q.shape
    _, BS, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(seq_lens[b])
        nb = (n + BS - 1) // BS
        ids = block_tables[b, :nb].long()
        k = k_cache[ids].reshape(nb * BS, Hkv, D)[:n].to(acc)  # (n, Hkv, D)
        v = v_cache[ids].reshape(nb * BS, Hkv, D)[:n].to(acc)
        k = k.repeat_interleave(G, dim=1)  # (n, Hq, D)
        v = v.repeat_interleave(G, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].to(acc), k) * scale  # (Hq, n)
        lse_b = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse_b[:, None])
        out[b] = torch.einsum("hn,nhd->hd", p, v).to(q.dtype)
        lse[b] = lse_b.float()
    return out, lse


# ----------------------------------------------------------------------------- torch (CPU)
# Measured on this 2-core box (fp32, Hq=9, Hkv=3, D=64, BS=16, min of repeated runs):
#   * the G query heads of a KV head are G query ROWS of one attention against that head's keys,
#     so torch's CPU flash kernel (`_scaled_dot_product_flash_attention_for_cpu`, which also
#     returns the log-sum-exp) does GQA decode in ONE op without repeating K/V:
#     B=16 L=100 padded 0.72 ms vs 1.34 ms for per-head bmm + logsumexp + exp + bmm (1 thread),
#     B=4 ragged 0.17 vs 0.37 ms (2 threads). Fewer ops also means fewer thread barriers, which
#     dominate on this shared box.
#   * B=1 L=4096: a zero-copy view when the sequence's blocks are consecutive 1.1 ms vs a gather
#     2.6 ms; block-diagonal single matmul (3x FLOPs) 8.0 ms; flattened scatter-softmax 8.2 ms.
#   * padded batch (one gather, additive -inf mask) for short contexts; per sequence beyond
#     (B=16 L=512: padded 8.0 ms vs per-sequence 4.2 ms - the padded copies fall out of cache).
_PADDED_MAX_LEN = 256
# Sequences longer than this (scattered blocks) are processed in chunks of this many tokens
# (8192 x Hkv=3 x D=64 fp32 = 6 MB per K chunk, L3-resident while used). Measured at L=4096 /
# 32768: 2048-token chunks 5.7 / 36 ms vs one gather 10.6 / 92 ms on 1 thread, but 7.7 vs 2.8 ms
# at L=4096 on 2 threads of the loaded box (each chunk adds ops, each a thread barrier).
_CHUNK_TOKENS = 8192

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def gqa_attend(q4, k4, v4, scale, mask=None):
    """q4 (B, Hkv, G, D) - the G query heads of each KV head as G query rows - against
    k4/v4 (B, Hkv, L, D) (any strides, last dim contiguous); mask additive (B, 1, 1, L) or None.
    -> (out (B, Hkv, G, D), lse (B, Hkv, G) fp32-or-wider). One fused op on CPU when available.
    Every row must see at least one key: the fused kernel returns lse 0 (not -inf) for a fully
    masked row and crashes the process (SIGFPE) on L == 0."""
    if _FLASH_CPU is not None and q4.device.type == "cpu" and q4.dtype in (torch.float32, torch.float64):
        out, lse = _FLASH_CPU(q4, k4, v4, 0.0, False, attn_mask=mask, scale=scale)[:2]
        return out, lse
    s = torch.matmul(q4 * scale, k4.transpose(-1, -2))  # (B, Hkv, G, L)
    if mask is not None:
        s = s + mask
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    return torch.matmul(torch.exp(s - lse), v4), lse.squeeze(-1)


def _merge_chunks(outs, lses):
    """Exact merge of per-chunk (out (..., D), lse (...)) lists."""
    o, l = torch.stack(outs), torch.stack(lses)  # (C, ..., D), (C, ...)
    m = l.amax(0)
    w = torch.exp(l - m)  # (C, ...)
    den = w.sum(0)
    return (o * w.unsqueeze(-1)).sum(0) / den.unsqueeze(-1), m + torch.log(den)


def _consecutive(row, nb):
    return nb == 1 or (nb >= 4 and bool((row[1:nb] - row[:nb - 1] == 1).all()))


def _seq_kv(cache, row, n, BS):
    """(n, Hkv, D) keys or values of one sequence: a view when its blocks are consecutive in the
    pool (no copy), else one index_select of its blocks."""
    nb = (n + BS - 1) // BS
    if _consecutive(row, nb):
        first = int(row[0])
        return cache[first:first + nb].flatten(0, 1)[:n]
    return cache.index_select(0, row[:nb].long()).flatten(0, 1)[:n]  # (nb*BS, Hkv, D) -> first n


def paged_decode_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """Vectorized torch path (no Python loop over tokens or blocks; see the measurements above)."""
    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens)
    B, Hq, D = q.shape
    _, BS, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    lens = [int(x) for x in seq_lens.tolist()]
    # (the fused CPU kernel divides by zero on an empty key set: SIGFPE, not an exception)
    check(B == 0 or min(lens) >= 1, f"every seq_len must be >= 1, got {lens}")
    block_tables = block_tables.to(q.device)
    q4 = q.to(acc).view(B, Hkv, G, D)  # GQA: a KV head's G query heads are G query rows

    if B > 1 and max(lens) <= _PADDED_MAX_LEN:
        nbl = [(n + BS - 1) // BS for n in lens]
        nb = max(nbl)
        ids = block_tables[:, :nb].long()  # (B, nb); entries past a sequence's end may be junk
        if min(nbl) < nb:
            nblk = torch.tensor(nbl, device=q.device)
            ids = ids.masked_fill(torch.arange(nb, device=q.device)[None, :] >= nblk[:, None], 0)
        ids = ids.reshape(-1)
        k = k_cache.index_select(0, ids).view(B, nb * BS, Hkv, D).to(acc).transpose(1, 2)  # (B, Hkv, L', D)
        v = v_cache.index_select(0, ids).view(B, nb * BS, Hkv, D).to(acc).transpose(1, 2)
        mask = None
        if min(lens) < nb * BS:
            pos = torch.arange(nb * BS, device=q.device)
            mask = torch.zeros(B, 1, 1, nb * BS, dtype=acc, device=q.device)
            mask.masked_fill_((pos[None, :] >= seq_lens.to(q.device)[:, None]).view(B, 1, 1, -1), float("-inf"))
        out, lse = gqa_attend(q4, k, v, scale, mask)
        return out.reshape(B, Hq, D).to(q.dtype), lse.reshape(B, Hq).float()

    out = torch.empty(B, Hq, D, dtype=acc, device=q.device)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
    for b in range(B):  # per sequence, never per token
        n = lens[b]
        row = block_tables[b]
        if n <= _CHUNK_TOKENS or _consecutive(row, (n + BS - 1) // BS):
            spans = [(0, n)]
        else:  # long and scattered: cache-sized gathers, merged exactly by log-sum-exp
            step = _CHUNK_TOKENS - _CHUNK_TOKENS % BS
            spans = [(t0, min(n, t0 + step)) for t0 in range(0, n, step)]
        outs, lses = [], []
        for t0, t1 in spans:
            k = _seq_kv(k_cache, row[t0 // BS:], t1 - t0, BS).to(acc)  # (t1-t0, Hkv, D)
            v = _seq_kv(v_cache, row[t0 // BS:], t1 - t0, BS).to(acc)
            o, l = gqa_attend(q4[b:b + 1], k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), scale)
            outs.append(o)
            lses.append(l)
        o, l = (outs[0], lses[0]) if len(outs) == 1 else _merge_chunks(outs, lses)
        out[b] = o.reshape(Hq, D)
        lse[b] = l.reshape(Hq)
    return out.to(q.dtype), lse


# ----------------------------------------------------------------------------- triton
def paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, tiles_per_split=None):
    """Split-K Triton decode: the block-sparse kernel with no selected blocks and one range
    [0, n) per sequence (see block_sparse_attention.py); each program handles the query heads of
    one KV head over `tiles_per_split` blocks, a second kernel merges the splits by log-sum-exp."""
    from .block_sparse_attention import sparse_decode_launch

    _check_inputs(q, k_cache, v_cache, block_tables, seq_lens)
    check(q.dtype in (torch.float32, torch.float16, torch.bfloat16), f"q dtype {q.dtype}")
    check(k_cache.stride(3) == 1, "cache head_dim must be contiguous")
    B = q.shape[0]
    Hkv = k_cache.shape[2]
    no_blocks = torch.empty(B, Hkv, 0, dtype=torch.int32, device=q.device)
    zeros = torch.zeros(B, dtype=torch.int32, device=q.device)
    return sparse_decode_launch(q, k_cache, v_cache, no_blocks, scale, block_tables, seq_lens.int().contiguous(),
                                zeros, zeros, tiles_per_split=tiles_per_split)


# ----------------------------------------------------------------------------- dispatch
def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """(out (B, Hq, D), lse (B, Hq) fp32). CUDA tensors -> Triton split-K kernel, else torch."""
    if use_triton(q, k_cache, v_cache):
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale)
    return paged_decode_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, scale)
