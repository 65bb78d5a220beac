"""Block-sparse decode attention: one query token per sequence over the KV blocks selected for
each (sequence, KV head), plus always-attended token ranges (attention sinks, local window),
with ONE softmax over the union. Reads fp blocks or KIVI int8/int4 blocks (`QuantizedKV`,
dequantized inside the kernel).

    q            (B, Hq, D)
    k_blocks     (NB, BS, Hkv, D) fp tensor, or QuantizedKV(kind="k") of that logical shape
    v_blocks     same (QuantizedKV kind="v")
    block_ids    (B, Hkv, K) int32 ids into the pool, -1 = unused slot (K may be 0). Selected blocks
                 are FULL blocks of BS tokens (InfLLM memory blocks, Quest pages outside the window).
    ranges (optional, all or none):
      block_tables (B, MAXB) int32  the sequence's blocks in the SAME pool (logical token t lives in
                   block block_tables[b, t // BS] at offset t % BS)
      seq_lens     (B,) int32       n
      sink_lens    (B,) int32       tokens [0, sink) are attended
      window_starts (B,) int32      tokens [window_start, n) are attended
    The caller keeps selected blocks disjoint from the ranges (a token counted twice would get
    twice its weight). Returns (out (B, Hq, D) q.dtype, lse (B, Hq) fp32); with nothing to attend:
    out = 0, lse = -inf (merges as an empty partial).

When sinks/window live in another tier (fp paged cache) than the memory blocks (quantized
tier), call twice and `merge_attention` the two partials: exact, same as one softmax.

    block_sparse_decode_attention_ref    gather + dense softmax per sequence (tests)
    block_sparse_decode_attention_torch  vectorized gathers of only the selected rows (CPU path)
    block_sparse_decode_attention_triton split-K kernel shared with paged decode (CUDA)
"""

import torch

from ._common import OnlineSoftmax, check, lazy_jit, tl, triton, use_triton
from .kv_quant import QuantizedKV, dequant_blocks, dequant_blocks_head, dequantize_kv_ref, gather_dequant_ref
from .paged_attention import gqa_attend

__all__ = [
    "block_sparse_decode_attention",
    "block_sparse_decode_attention_ref",
    "block_sparse_decode_attention_torch",
    "block_sparse_decode_attention_triton",
    "sparse_decode_launch",
]


def _pool_shape(pool):
    return tuple(pool.shape)  # QuantizedKV.shape is the logical (N, BS, H, D)


def _check(q, kb, vb, block_ids, ranges):
    check(q.dim() == 3, f"q must be (B, Hq, D), got {tuple(q.shape)}")
    ks, vs = _pool_shape(kb), _pool_shape(vb)
    check(len(ks) == 4 and ks == vs, f"k/v pools must both be (NB, BS, Hkv, D), got {ks} / {vs}")
    B, Hq, D = q.shape
    check(ks[3] == D, "head_dim mismatch")
    check(Hq % ks[2] == 0, f"Hq={Hq} not a multiple of Hkv={ks[2]}")
    check(block_ids.dim() == 3 and block_ids.shape[:2] == (B, ks[2]), "block_ids must be (B, Hkv, K)")
    check(not block_ids.dtype.is_floating_point, "block_ids must be integer")
    if isinstance(kb, QuantizedKV):
        check(kb.kind == "k", "k_blocks must be a key-quantized QuantizedKV (kind='k')")
    if isinstance(vb, QuantizedKV):
        check(vb.kind == "v", "v_blocks must be a value-quantized QuantizedKV (kind='v')")
    if not isinstance(kb, QuantizedKV) and not isinstance(vb, QuantizedKV):
        check(kb.dtype == vb.dtype, "k/v pool dtypes differ")
    n_given = sum(x is not None for x in ranges)
    check(n_given in (0, 4), "block_tables, seq_lens, sink_lens, window_starts: pass all or none")
    if n_given:
        bt, n, sink, ws = ranges
        check(bt.dim() == 2 and bt.shape[0] == B, "block_tables must be (B, MAXB)")
        for name, t in (("seq_lens", n), ("sink_lens", sink), ("window_starts", ws)):
            check(t.shape == (B,), f"{name} must be (B,)")


def _range_tokens(seq_lens, sink_lens, window_starts):
    """Logical token positions (B, R) of sinks + window, and their validity mask."""
    n, sink, ws = (x.long() for x in (seq_lens, sink_lens, window_starts))
    sink = torch.minimum(sink, n)
    ws = torch.maximum(ws, sink)  # a window that reaches into the sinks must not count tokens twice
    cnt = sink + (n - ws).clamp_min(0)
    R = int(cnt.max()) if cnt.numel() else 0
    r = torch.arange(R, device=n.device)[None, :]
    pos = torch.where(r < sink[:, None], r, ws[:, None] + r - sink[:, None])  # (B, R)
    valid = r < cnt[:, None]
    return pos.masked_fill(~valid, 0), valid


def _rows_all_heads(pool, rows, Hkv):
    """fp32 (B, R, Hkv, D) rows of a pool at flat token index rows (B, R)."""
    if isinstance(pool, QuantizedKV):
        return gather_dequant_ref(pool, rows[..., None], torch.arange(Hkv, device=rows.device))
    N, BS, H, D = pool.shape
    return pool.reshape(N * BS, H, D)[rows].float()


def _merge_partials(outs, lses):
    """Exact log-sum-exp merge of partials over disjoint key sets; empty partials have lse -inf."""
    o, l = torch.stack(outs), torch.stack(lses)  # (C, ..., D), (C, ...)
    m = l.amax(0)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(l - m)  # 0 for empty partials
    den = w.sum(0)
    out = (o * w.unsqueeze(-1)).sum(0) / den.clamp_min(1e-30).unsqueeze(-1)
    return out, torch.where(den > 0, m + torch.log(den), torch.full_like(den, float("-inf")))


def _consecutive_runs(ids):
    """[(first id, length)] of sorted ids (-1 = unused) if they form few long runs (mean run >= 8
    blocks, where a view beats a gather), else None."""
    v = ids[ids >= 0]
    if v.numel() == 0:
        return []
    if v.numel() > 1 and bool((v[1:] == v[:-1]).any()):
        return None  # duplicates: the gather path counts them like the reference does
    brk = torch.nonzero(v[1:] - v[:-1] != 1).flatten() + 1
    if brk.numel() + 1 > max(1, v.numel() // 8):
        return None
    edges = [0] + brk.tolist() + [v.numel()]
    starts = v[edges[:-1]].tolist()
    return [(a, edges[i + 1] - edges[i]) for i, a in enumerate(starts)]


def _gather_blocks(pool, ids):
    """fp32 (len(ids), BS, Hkv, D) whole blocks."""
    if isinstance(pool, QuantizedKV):
        return dequant_blocks(pool, ids)
    return pool.index_select(0, ids).float()


def _gather_heads(pool, ids, B, c, BS, D, dev):
    """fp32 (Hkv, B*c, BS, D): for each KV head h, blocks ids[:, h] (B, c) of that head."""
    Hkv = ids.shape[1]
    if isinstance(pool, QuantizedKV):
        return torch.stack([dequant_blocks_head(pool, ids[:, h].reshape(-1), h) for h in range(Hkv)])
    if pool.dtype != torch.float32:
        return torch.stack([pool[:, :, h].index_select(0, ids[:, h].reshape(-1)).float() for h in range(Hkv)])
    buf = torch.empty(Hkv, B * c, BS, D, device=dev)
    for h in range(Hkv):  # straight into the buffer: no second copy
        torch.index_select(pool[:, :, h], 0, ids[:, h].reshape(-1), out=buf[h])
    return buf


# ----------------------------------------------------------------------------- torch
# Selected blocks are gathered this many bytes (fp32, all sequences and heads) at a time and
# absorbed into an online softmax: the gathered copy stays in L2 (4 MB/core here), so DRAM
# sees the selected KV about once instead of three times (read, write copy, read copy).
_CHUNK_BYTES = 2 << 20


def block_sparse_decode_attention_torch(q, k_blocks, v_blocks, block_ids, scale, *, block_tables=None,
                                        seq_lens=None, sink_lens=None, window_starts=None):
    ranges = (block_tables, seq_lens, sink_lens, window_starts)
    _check(q, k_blocks, v_blocks, block_ids, ranges)
    B, Hq, D = q.shape
    _, BS, Hkv, _ = _pool_shape(k_blocks)
    G = Hq // Hkv
    dev = q.device
    qs = q.float().view(B, Hkv, G, D) * scale  # (B, Hkv, G, D)
    qh = qs.transpose(0, 1)  # (Hkv, B, G, D)
    acc = OnlineSoftmax((Hkv, B, G), D, dev)  # head-major: each head's bmm writes a contiguous slab

    if block_tables is not None:  # sinks + window, shared by every head
        pos, valid = _range_tokens(seq_lens.to(dev), sink_lens.to(dev), window_starts.to(dev))  # (B, R)
        if pos.shape[1]:
            bt = block_tables.to(dev).long()
            prow = torch.gather(bt, 1, pos // BS) * BS + pos % BS  # (B, R) flat pool rows
            krng = _rows_all_heads(k_blocks, prow, Hkv).permute(2, 0, 1, 3)  # (Hkv, B, R, D)
            vrng = _rows_all_heads(v_blocks, prow, Hkv).permute(2, 0, 1, 3)
            sr = torch.matmul(qh, krng.transpose(-1, -2))  # (Hkv, B, G, R)
            sr.masked_fill_(~valid[None, :, None, :], float("-inf"))
            acc.absorb(sr, vrng)

    # softmax ignores order: sorted ids let heads that picked the same SET share one gather,
    # and consecutive blocks become runs attended through views
    ids = block_ids.to(dev).long()
    K = ids.shape[2]
    if K == 0:
        out, lse = acc.result()
        return out.transpose(0, 1).reshape(B, Hq, D).to(q.dtype), lse.transpose(0, 1).reshape(B, Hq)
    ids = ids.sort(dim=-1).values
    has_pad = bool(ids[:, :, 0].min() < 0)  # sorted: a -1 would be first
    shared = Hkv == 1 or bool((ids == ids[:, :1]).all())
    step = max(1, _CHUNK_BYTES // max(1, B * Hkv * BS * D * 4))

    fp_pools = torch.is_tensor(k_blocks) and torch.is_tensor(v_blocks)
    runs = _consecutive_runs(ids[0, 0]) if shared and B == 1 and fp_pools else None
    if runs is not None:
        # one sequence whose selected blocks lie in a few runs of consecutive pool blocks (a
        # session's memory blocks appended in order): views of the pool, no copy at all, each
        # run one fused attention (torch's CPU flash kernel via gqa_attend; a run is never empty,
        # so its lse is exact), merged with the ranges' partial by log-sum-exp
        outs, lses = [], []
        for a, n_blk in runs:
            kv = k_blocks[a:a + n_blk].view(1, n_blk * BS, Hkv, D).transpose(1, 2)  # (1, Hkv, R, D) view
            vv = v_blocks[a:a + n_blk].view(1, n_blk * BS, Hkv, D).transpose(1, 2)
            o, l = gqa_attend(q.float().view(1, Hkv, G, D), kv.float(), vv.float(), scale)
            outs.append(o.transpose(0, 1))  # (Hkv, 1, G, D)
            lses.append(l.float().transpose(0, 1))
        o0, l0 = acc.result()
        out, lse = _merge_partials([o0] + outs, [l0] + lses)
        return out.transpose(0, 1).reshape(B, Hq, D).to(q.dtype), lse.transpose(0, 1).reshape(B, Hq)
    elif shared:
        # one selection for all heads (InfLLM's shared top-k, or all blocks): contiguous
        # index_select of whole blocks, chunked so the copy is re-read from cache, each chunk one
        # fused attention; a sequence whose chunk is all padding gets an empty partial (the fused
        # kernel would report lse 0 for a fully masked row)
        o0, l0 = acc.result()  # the ranges' partial (empty: lse -inf)
        outs, lses = [o0], [l0]
        q4 = q.float().view(B, Hkv, G, D)
        for c0 in range(0, K, step):
            cid = ids[:, 0, c0:c0 + step]  # (B, c)
            c = cid.shape[1]
            flat = cid.clamp_min(0).reshape(-1)
            kb = _gather_blocks(k_blocks, flat).view(B, c * BS, Hkv, D).transpose(1, 2)  # (B, Hkv, R, D)
            vb = _gather_blocks(v_blocks, flat).view(B, c * BS, Hkv, D).transpose(1, 2)
            mask = None
            if has_pad:
                mask = torch.zeros(B, 1, 1, c * BS, device=dev)
                mask.masked_fill_((cid < 0).repeat_interleave(BS, dim=1).view(B, 1, 1, -1), float("-inf"))
            o, l = gqa_attend(q4, kb, vb, scale, mask)  # (B, Hkv, G, D), (B, Hkv, G)
            l = l.float()
            if has_pad:
                empty = (cid >= 0).sum(1) == 0  # (B,)
                l = l.masked_fill(empty.view(B, 1, 1), float("-inf"))
                o = o.masked_fill(empty.view(B, 1, 1, 1), 0.0)
            outs.append(o.transpose(0, 1))
            lses.append(l.transpose(0, 1))
        out, lse = _merge_partials(outs, lses)
        return out.transpose(0, 1).reshape(B, Hq, D).to(q.dtype), lse.transpose(0, 1).reshape(B, Hq)
    else:
        for c0 in range(0, K, step):  # per-head selections: chunks of selected blocks, never per block
            cid = ids[:, :, c0:c0 + step]  # (B, Hkv, c)
            c = cid.shape[2]
            safe = cid.clamp_min(0)
            kbuf = _gather_heads(k_blocks, safe, B, c, BS, D, dev).view(Hkv, B, c * BS, D)
            s = torch.matmul(qh, kbuf.transpose(-1, -2))  # (Hkv, B, G, c*BS)
            if has_pad:
                s.masked_fill_((cid < 0).transpose(0, 1).repeat_interleave(BS, dim=2).unsqueeze(2), float("-inf"))
            acc.absorb(s, _gather_heads(v_blocks, safe, B, c, BS, D, dev).view(Hkv, B, c * BS, D))
    out, lse = acc.result()  # (Hkv, B, G, D), (Hkv, B, G)
    return out.transpose(0, 1).reshape(B, Hq, D).to(q.dtype), lse.transpose(0, 1).reshape(B, Hq)


# ----------------------------------------------------------------------------- reference
def block_sparse_decode_attention_ref(q, k_blocks, v_blocks, block_ids, scale, *, block_tables=None,
                                      seq_lens=None, sink_lens=None, window_starts=None):
    """Dequantize the whole pool, list each (sequence, head)'s tokens, dense softmax. Slow, simple."""
    ranges = (block_tables, seq_lens, sink_lens, window_starts)
    _check(q, k_blocks, v_blocks, block_ids, ranges)
    kf = dequantize_kv_ref(k_blocks) if isinstance(k_blocks, QuantizedKV) else k_blocks.float()
    vf = dequantize_kv_ref(v_blocks) if isinstance(v_blocks, QuantizedKV) else v_blocks.float()
    N, BS, Hkv, D = kf.shape
    B, Hq, _ = q.shape
    G = Hq // Hkv
    out = torch.zeros(B, Hq, D, dtype=torch.float32)
    lse = torch.full((B, Hq), float("-inf"))
    for b in range(B):
        toks = []
        if block_tables is not None:
            n, sink, ws = int(seq_lens[b]), int(sink_lens[b]), int(window_starts[b])
            sink = min(sink, n)
            logical = list(range(sink)) + list(range(max(ws, sink), n))
            toks = [int(block_tables[b, t // BS]) * BS + t % BS for t in logical]
        for h in range(Hkv):
            rows = toks + [int(i) * BS + t for i in block_ids[b, h].tolist() if i >= 0 for t in range(BS)]
            if not rows:
                continue
            k = kf.reshape(N * BS, Hkv, D)[rows, h]  # (n, D)
            v = vf.reshape(N * BS, Hkv, D)[rows, h]
            for g in range(G):
                s = (k @ q[b, h * G + g].float()) * scale
                lse[b, h * G + g] = torch.logsumexp(s, 0)
                out[b, h * G + g] = torch.softmax(s, 0) @ v
    return out.to(q.dtype), lse


# ----------------------------------------------------------------------------- triton
def _sparse_decode_kernel(
    q_ptr, sqb, sqh, sqd,
    k_ptr, ks_ptr, kz_ptr, v_ptr, vs_ptr, vz_ptr,
    skn, skt, skh, skd,  # fp pool strides (unused when quantized: data/meta are contiguous)
    ids_ptr, sib, sih, sik, K,
    bt_ptr, sbt, n_ptr, sink_ptr, ws_ptr,
    po_ptr, pl_ptr,  # partials: po (B, Hq, S, D) fp32, pl (B, Hq, S) fp32, contiguous
    scale, BS, Hkv, Hq, D, S, TPS, NGK, NGV,
    G: tl.constexpr, G_P2: tl.constexpr, TILE: tl.constexpr, SUB: tl.constexpr, BLOCK_D: tl.constexpr,
    KBITS: tl.constexpr, VBITS: tl.constexpr, GROUP: tl.constexpr,
):
    # Program (b * Hkv + h, split): the G query heads of KV head h over tiles
    # [split * TPS, (split + 1) * TPS) of the virtual tile list
    #   [K selected blocks x SUB tiles] + [ceil(sink / TILE) sink tiles] + [ceil((n - ws) / TILE) window tiles].
    # Tile rows are flat pool rows (block * BS + offset), so selected blocks and paged ranges share
    # one loop body without branches; online softmax in fp32.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // Hkv
    h = pid % Hkv
    ar = tl.arange(0, TILE)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    g = tl.arange(0, G_P2)
    gm = g < G
    qh = h * G + g  # (G_P2,) query heads of this group
    qv = tl.load(q_ptr + b * sqb + qh[:, None] * sqh + d[None, :] * sqd, mask=gm[:, None] & dm[None, :],
                 other=0.0).to(tl.float32) * scale  # (G_P2, BLOCK_D)

    n = tl.load(n_ptr + b)  # ranges: zeros when the launch has none
    sink = tl.minimum(tl.load(sink_ptr + b), n)
    ws = tl.maximum(tl.load(ws_ptr + b), sink)
    ns = tl.cdiv(sink, TILE)
    KT = K * SUB  # selected blocks are cut into SUB tiles of TILE rows (TILE caps register use)
    total = KT + ns + tl.cdiv(tl.maximum(n - ws, 0), TILE)
    t0 = split * TPS
    t1 = tl.minimum(t0 + TPS, total)

    m_i = tl.full([G_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([G_P2], tl.float32)
    acc = tl.zeros([G_P2, BLOCK_D], tl.float32)
    for t in range(t0, t1):
        tt = tl.zeros([TILE], tl.int32) + t  # tile index as a vector: masks stay tensors
        is_sel = tt < KT
        slot = tt // SUB
        sub = (tt % SUB) * TILE + ar  # row inside the selected block
        blk = tl.load(ids_ptr + b * sib + h * sih + slot * sik, mask=is_sel, other=-1)  # one id, broadcast
        u = tt - KT
        in_sink = u < ns
        tok = tl.where(in_sink, u * TILE, ws + (u - ns) * TILE) + ar  # logical tokens of a range tile
        lim = tl.where(in_sink, sink, n)
        rng_ok = (tt >= KT) & (tok < lim)
        pblk = tl.load(bt_ptr + b * sbt + tok // BS, mask=rng_ok, other=0)
        rb = tl.where(is_sel, blk, pblk)  # (TILE,) pool block of each row
        ro = tl.where(is_sel, sub, tok % BS)  # (TILE,) offset inside the block
        ok = tl.where(is_sel, (sub < BS) & (blk >= 0), rng_ok)
        ok2 = ok[:, None] & dm[None, :]
        row = rb * BS + ro
        # ---- keys (TILE, BLOCK_D), dequantized in registers
        if KBITS == 0:
            kt = tl.load(k_ptr + rb[:, None] * skn + ro[:, None] * skt + h * skh + d[None, :] * skd,
                         mask=ok2, other=0.0).to(tl.float32)
        else:
            if KBITS == 8:
                kc = tl.load(k_ptr + (row[:, None] * Hkv + h) * D + d[None, :], mask=ok2, other=0).to(tl.float32)
            else:
                kby = tl.load(k_ptr + (row[:, None] * Hkv + h) * (D // 2) + d[None, :] // 2, mask=ok2, other=0)
                kc = ((kby >> ((d[None, :] % 2) * 4).to(tl.uint8)) & 0xF).to(tl.float32)
            kmo = ((rb[:, None] * NGK + ro[:, None] // GROUP) * Hkv + h) * D + d[None, :]  # per-channel meta
            kt = kc * tl.load(ks_ptr + kmo, mask=ok2, other=0.0) + tl.load(kz_ptr + kmo, mask=ok2, other=0.0)
        s = tl.sum(qv[:, None, :] * kt[None, :, :], axis=2)  # (G_P2, TILE)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # ---- values
        if VBITS == 0:
            vt = tl.load(v_ptr + rb[:, None] * skn + ro[:, None] * skt + h * skh + d[None, :] * skd,
                         mask=ok2, other=0.0).to(tl.float32)
        else:
            if VBITS == 8:
                vc = tl.load(v_ptr + (row[:, None] * Hkv + h) * D + d[None, :], mask=ok2, other=0).to(tl.float32)
            else:
                vby = tl.load(v_ptr + (row[:, None] * Hkv + h) * (D // 2) + d[None, :] // 2, mask=ok2, other=0)
                vc = ((vby >> ((d[None, :] % 2) * 4).to(tl.uint8)) & 0xF).to(tl.float32)
            vmo = (row[:, None] * Hkv + h) * NGV + d[None, :] // GROUP  # per-token meta
            vt = vc * tl.load(vs_ptr + vmo, mask=ok2, other=0.0) + tl.load(vz_ptr + vmo, mask=ok2, other=0.0)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt[None, :, :], axis=1)
        m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    base = (b * Hq + qh) * S + split  # (G_P2,)
    tl.store(po_ptr + base[:, None] * D + d[None, :], o, mask=gm[:, None] & dm[None, :])
    tl.store(pl_ptr + base, lse, mask=gm)


def _split_merge_kernel(po_ptr, pl_ptr, o_ptr, l_ptr, S, D, S_P2: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program per (b, query head): log-sum-exp merge of its S split partials
    row = tl.program_id(0)
    sv = tl.arange(0, S_P2)
    d = tl.arange(0, BLOCK_D)
    sm = sv < S
    lse = tl.load(pl_ptr + row * S + sv, mask=sm, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_use)  # (S_P2,)
    den = tl.sum(w, axis=0)
    o = tl.load(po_ptr + (row * S + sv[:, None]) * D + d[None, :], mask=sm[:, None] & (d[None, :] < D), other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(den > 0, den, 1.0)
    tl.store(o_ptr + row * D + d, out.to(o_ptr.dtype.element_ty), mask=d < D)
    tl.store(l_ptr + row, tl.where(den > 0, m_use + tl.log(tl.where(den > 0, den, 1.0)), float("-inf")))


_sparse_jit = lazy_jit(_sparse_decode_kernel)
_merge_jit = lazy_jit(_split_merge_kernel)


def _pool_args(pool, Hkv, D):
    """(ptr, scale, zero, bits, strides) for the kernel; quantized data/meta must be contiguous."""
    if isinstance(pool, QuantizedKV):
        for t in (pool.data, pool.scale, pool.zero):
            check(t.is_contiguous(), "QuantizedKV tensors must be contiguous")
        check(pool.group == 32 or pool.group % 2 == 0, "bad group")
        return pool.data, pool.scale, pool.zero, pool.bits, None
    check(pool.dtype in (torch.float32, torch.float16, torch.bfloat16), f"pool dtype {pool.dtype}")
    check(pool.stride(3) == 1, "pool head_dim must be contiguous (stride 1)")
    return pool, pool, pool, 0, pool.stride()


def sparse_decode_launch(q, k_blocks, v_blocks, block_ids, scale, block_tables, seq_lens, sink_lens,
                         window_starts, num_splits=None, tiles_per_split=None, tile=None):
    """Launcher shared by block-sparse and paged decode (paged = no selected blocks, sink 0, window 0..n)."""
    B, Hq, D = q.shape
    _, BS, Hkv, _ = _pool_shape(k_blocks)
    G = Hq // Hkv
    dev = q.device
    kp, ks, kz, kbits, kstr = _pool_args(k_blocks, Hkv, D)
    vp, vs, vz, vbits, vstr = _pool_args(v_blocks, Hkv, D)
    groups = [p.group for p in (k_blocks, v_blocks) if isinstance(p, QuantizedKV)]
    check(len(set(groups)) <= 1, "k and v quantization groups must match")
    group = groups[0] if groups else 32
    strides = kstr or vstr or (0, 0, 0, 0)
    if kstr and vstr:
        check(kstr == vstr, "k and v pools must have equal strides")
    ngk = k_blocks.scale.shape[1] if kbits else 1
    ngv = v_blocks.scale.shape[3] if vbits else 1
    check(block_ids.dtype in (torch.int32, torch.int64), "block_ids must be int32/int64")
    K = block_ids.shape[2]
    has_ranges = block_tables is not None
    if not has_ranges:  # zero-length ranges (n = sink = window start = 0)
        block_tables = torch.zeros(B, 1, dtype=torch.int32, device=dev)
        seq_lens = sink_lens = window_starts = torch.zeros(B, dtype=torch.int32, device=dev)
    for name, t in (("seq_lens", seq_lens), ("sink_lens", sink_lens), ("window_starts", window_starts)):
        check(t.is_contiguous() and not t.dtype.is_floating_point, f"{name} must be a contiguous int tensor")
    # rows per tile: a whole block up to 32 rows; larger blocks (InfLLM's 128) are cut into SUB
    # tiles so the (G, TILE, D) product stays in registers on a GPU
    TILE = tile or min(max(triton.next_power_of_2(BS), 2), 32)
    SUB = triton.cdiv(BS, TILE)
    # worst-case tiles of one (sequence, head): the split count is fixed per launch (grid is static)
    max_rng = 0
    if has_ranges:
        max_rng = int((seq_lens.long() - window_starts.long()).clamp_min(0).max()) + int(sink_lens.max())
    max_tiles = K * SUB + triton.cdiv(max_rng, TILE) + (2 if has_ranges else 0)
    if tiles_per_split is None:
        # enough programs to fill a GPU (~4 per SM on 132 SMs), each at least 4 tiles long
        want_splits = num_splits or max(1, min(64, triton.cdiv(512, max(1, B * Hkv))))
        tiles_per_split = max(4, triton.cdiv(max(max_tiles, 1), want_splits))
    S = max(1, triton.cdiv(max(max_tiles, 1), tiles_per_split))
    po = torch.empty(B, Hq, S, D, dtype=torch.float32, device=dev)
    pl = torch.empty(B, Hq, S, dtype=torch.float32, device=dev)
    _sparse_jit()[(B * Hkv, S)](
        q, *q.stride(), kp, ks, kz, vp, vs, vz, *strides,
        block_ids, *block_ids.stride(), K, block_tables, block_tables.stride(0), seq_lens, sink_lens, window_starts,
        po, pl, float(scale), BS, Hkv, Hq, D, S, tiles_per_split, ngk, ngv,
        G=G, G_P2=max(triton.next_power_of_2(G), 2), TILE=TILE, SUB=SUB, BLOCK_D=triton.next_power_of_2(D),
        KBITS=kbits, VBITS=vbits, GROUP=group,
    )
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=dev)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=dev)
    _merge_jit()[(B * Hq,)](po, pl, out, lse, S, D, S_P2=max(triton.next_power_of_2(S), 2),
                            BLOCK_D=triton.next_power_of_2(D))
    return out, lse


def block_sparse_decode_attention_triton(q, k_blocks, v_blocks, block_ids, scale, *, block_tables=None,
                                         seq_lens=None, sink_lens=None, window_starts=None, tiles_per_split=None,
                                         tile=None):
    _check(q, k_blocks, v_blocks, block_ids, (block_tables, seq_lens, sink_lens, window_starts))
    check(q.dtype in (torch.float32, torch.float16, torch.bfloat16), f"q dtype {q.dtype}")
    return sparse_decode_launch(q, k_blocks, v_blocks, block_ids, scale, block_tables, seq_lens, sink_lens,
                                window_starts, tiles_per_split=tiles_per_split, tile=tile)


# ----------------------------------------------------------------------------- dispatch
def block_sparse_decode_attention(q, k_blocks, v_blocks, block_ids, scale, *, block_tables=None,
                                  seq_lens=None, sink_lens=None, window_starts=None):
    """(out, lse) over selected blocks (+ sink/window ranges). CUDA -> Triton, else torch."""
    kd = k_blocks.data if isinstance(k_blocks, QuantizedKV) else k_blocks
    if use_triton(q, kd):
        fn = block_sparse_decode_attention_triton
    else:
        fn = block_sparse_decode_attention_torch
    return fn(q, k_blocks, v_blocks, block_ids, scale, block_tables=block_tables, seq_lens=seq_lens,
              sink_lens=sink_lens, window_starts=window_starts)
