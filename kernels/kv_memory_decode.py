"""Decode attention of the retrieval KV memory (runtime/kv_memory) for a ragged batch of sequences:
ONE softmax per (sequence, query head) over [memory blocks | far window | local window], read from
each sequence's own buffers in place (no packing copy), plus the attention each window column
received (the memory builds block representatives from it).

Per sequence b of B, in the memory's layouts (column-major keys, runtime/kv_memory/store.py):
    keys[b]    (2, Hkv, D, W_b)  plane 0: keys without RoPE, plane 1: keys rotated at their positions;
                                 the column (last) dim must have stride 1
    values[b]  (Hkv, W_b, D)     head_dim stride 1
    n_blocks   (B,) ints m_b     columns [0, m_b) are memory blocks      -> q_far . plane 0 (+ pads[b])
    n_far      (B,) ints f_b     columns [m_b, m_b + f_b): far window     -> q_far . plane 0
                                 columns [m_b + f_b, W_b): local window   -> q_loc . plane 1
    pads       None, or B entries None / (Hkv, m_b) additive 0 / -inf over the block columns (free slots)
    q_far, q_loc (B, Hq, D); logits = q . k * scale; GQA: query head i reads KV head i // (Hq // Hkv).
Returns out (B, Hq, D) in q's dtype, lse (B, Hq) fp32 (the torch path computes it only with
return_lse=True, else None), received: B fp32 tensors (Hkv, W_b - m_b): each window column's
probability summed over the GQA group's query heads.

    kv_memory_decode_attention_ref     float64, explicit per (sequence, head) (tests)
    kv_memory_decode_attention_torch   per sequence, 3 bmm + one in-place softmax on the buffers (CPU)
    kv_memory_decode_attention_triton  one launch for all sequences: per-sequence base pointers and
                                       strides in int64 arrays (ragged, no padding of the KV)
"""

from __future__ import annotations

import torch

from ._common import check, lazy_jit, tl, triton, use_triton, workspace

__all__ = [
    "kv_memory_decode_attention",
    "kv_memory_decode_attention_ref",
    "kv_memory_decode_attention_torch",
    "kv_memory_decode_attention_triton",
]


def _check(q_far, q_loc, keys, values, n_blocks, n_far, pads):
    check(q_far.dim() == 3 and q_far.shape == q_loc.shape, "q_far and q_loc must both be (B, Hq, D)")
    B, Hq, D = q_far.shape
    check(len(keys) == B and len(values) == B, f"keys / values: one tensor per sequence ({B}) expected")
    check(len(n_blocks) == B and len(n_far) == B, "n_blocks / n_far: one count per sequence expected")
    check(pads is None or len(pads) == B, "pads: None or one entry per sequence")
    for b in range(B):
        kb, vb = keys[b], values[b]
        check(kb.dim() == 4 and kb.shape[0] == 2 and kb.shape[2] == D, f"keys[{b}] must be (2, Hkv, D, W)")
        hkv, w = kb.shape[1], kb.shape[3]
        check(Hq % hkv == 0, f"Hq={Hq} not a multiple of Hkv={hkv}")
        check(vb.shape == (hkv, w, D), f"values[{b}] must be (Hkv, W, D) = {(hkv, w, D)}, got {tuple(vb.shape)}")
        m, f = int(n_blocks[b]), int(n_far[b])
        check(0 <= m and 0 <= f and m + f <= w, f"sequence {b}: n_blocks + n_far ({m} + {f}) exceeds W={w}")
        if pads is not None and pads[b] is not None:
            check(pads[b].shape == (hkv, m), f"pads[{b}] must be (Hkv, n_blocks) = {(hkv, m)}")


# ----------------------------------------------------------------------------- reference
def kv_memory_decode_attention_ref(q_far, q_loc, keys, values, n_blocks, n_far, pads=None, scale=1.0):
    """float64, one (sequence, query head) at a time: logits of every column, softmax, weighted sum."""
    _check(q_far, q_loc, keys, values, n_blocks, n_far, pads)
    B, Hq, D = q_far.shape
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq), float("-inf"), dtype=torch.float64)
    received = []
    for b in range(B):
        kb, vb = keys[b].double().cpu(), values[b].double().cpu()
        hkv, w = kb.shape[1], kb.shape[3]
        g = Hq // hkv
        m, f = int(n_blocks[b]), int(n_far[b])
        rec = torch.zeros(hkv, w - m, dtype=torch.float64)
        for i in range(Hq):
            h = i // g
            s = torch.empty(w, dtype=torch.float64)
            s[: m + f] = (q_far[b, i].double().cpu() @ kb[0, h, :, : m + f]) * scale
            s[m + f :] = (q_loc[b, i].double().cpu() @ kb[1, h, :, m + f :]) * scale
            if pads is not None and pads[b] is not None:
                s[:m] += pads[b][h].double().cpu()
            if w == 0 or bool(torch.isinf(s).all()):
                continue
            lse[b, i] = torch.logsumexp(s, 0)
            p = torch.softmax(s, 0)
            out[b, i] = p @ vb[h]
            rec[h] += p[m:]
        received.append(rec)
    return out, lse, received


# ----------------------------------------------------------------------------- torch (CPU)
def kv_memory_decode_attention_torch(q_far, q_loc, keys, values, n_blocks, n_far, pads=None, scale=1.0,
                                     return_lse=False):
    """Per sequence (its buffers in place, zero-copy; a padded batch would copy every sequence's window
    first): logits written by two bmm into one reused workspace ([blocks | far] with q_far, local with
    q_loc; a GQA group's G query heads are G rows of one bmm, not G copies of the keys), one in-place
    softmax, one bmm with the values. Measured as the KV memory's decode path (moved here from
    runtime/kv_memory/attention.py): 52 torch calls (~13 kernels, 3 bmm) per layer where a chunk-shaped
    path made ~94; with the blocks in the window buffer's front region 3 bmm instead of 5, 279 -> 238 us
    per layer at 32k on this CPU. Pass pre-scaled queries and scale=1.0 to skip the scaling (the memory
    folds the scale into its RoPE tables)."""
    _check(q_far, q_loc, keys, values, n_blocks, n_far, pads)
    B, Hq, D = q_far.shape
    dt = q_far.dtype
    cdt = torch.promote_types(dt, torch.float32)  # logits and softmax in fp32 at least
    out = torch.empty(B, Hq, D, dtype=dt, device=q_far.device)
    lses, received = [], []
    for b in range(B):
        kb, vb = keys[b], values[b]
        hkv, w = kb.shape[1], kb.shape[3]
        g = Hq // hkv
        m, f = int(n_blocks[b]), int(n_far[b])
        qf, ql = q_far[b].view(hkv, g, D), q_loc[b].view(hkv, g, D)
        if scale != 1.0:
            qf, ql = qf * scale, ql * scale
        if cdt != dt or kb.dtype != cdt:
            qf, ql, kb, vb = qf.to(cdt), ql.to(cdt), kb.to(cdt), vb.to(cdt)
        lg = workspace(hkv * g * w, cdt, q_far.device).view(hkv, g, w)
        if m + f:
            torch.bmm(qf, kb[0, :, :, : m + f], out=lg[..., : m + f])
            pad = None if pads is None else pads[b]
            if pad is not None:
                lg[..., :m].add_(pad[:, None, :])
        torch.bmm(ql, kb[1, :, :, m + f :], out=lg[..., m + f :])
        if return_lse:
            lses.append(torch.logsumexp(lg, -1).reshape(Hq).float())
        p = torch.ops.aten._softmax.out(lg, -1, False, out=lg)
        if cdt == dt:
            torch.bmm(p, vb, out=out[b].view(hkv, g, D))
        else:
            out[b] = torch.bmm(p, vb).view(Hq, D).to(dt)
        received.append(p[..., m:].sum(1).float())  # (Hkv, W - m)
    lse = torch.stack(lses) if return_lse else None
    return out, lse, received


# ----------------------------------------------------------------------------- triton
def _kvm_decode_kernel(qf_ptr, ql_ptr, sqb, sqh, kp_ptr, vp_ptr, pp_ptr, meta_ptr,
                       o_ptr, l_ptr, r_ptr, srb, srh, scale, Hkv, D,
                       G: tl.constexpr, G_P2: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr,
                       DT: tl.constexpr, NM: tl.constexpr):
    # Program b * Hkv + h: the G query heads of KV head h of sequence b over all W_b columns, in tiles of
    # TILE columns: first the [blocks | far] tiles (q_far, plane 0), then the local tiles (q_loc, plane 1),
    # one online softmax in fp32; a second pass over the same tiles turns the logits into probabilities
    # with the final lse and stores each window column's sum over the group (`received`).
    # Sequence b's buffers are reached through 64-bit base pointers (a ragged batch without copies);
    # meta row b: [W, m, f, plane stride, head stride, d stride (keys), head stride, column stride
    # (values), has_pad].
    pid = tl.program_id(0)
    b = pid // Hkv
    h = pid % Hkv
    mrow = meta_ptr + b * NM
    W = tl.load(mrow + 0)
    m = tl.load(mrow + 1)
    f = tl.load(mrow + 2)
    sk0 = tl.load(mrow + 3)
    sk1 = tl.load(mrow + 4)
    sk2 = tl.load(mrow + 5)
    sv0 = tl.load(mrow + 6)
    sv1 = tl.load(mrow + 7)
    hp = tl.load(mrow + 8)
    kp = tl.load(kp_ptr + b).to(tl.pointer_type(DT))
    vp = tl.load(vp_ptr + b).to(tl.pointer_type(DT))
    pp = tl.load(pp_ptr + b).to(tl.pointer_type(tl.float32))
    ar = tl.arange(0, TILE)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    g = tl.arange(0, G_P2)
    gm = g < G
    qh = h * G + g
    qmask = gm[:, None] & dm[None, :]
    qoff = b * sqb + qh[:, None] * sqh + d[None, :]
    qf = tl.load(qf_ptr + qoff, mask=qmask, other=0.0).to(tl.float32) * scale  # (G_P2, BLOCK_D)
    ql = tl.load(ql_ptr + qoff, mask=qmask, other=0.0).to(tl.float32) * scale
    mf = m + f
    nft = tl.cdiv(mf, TILE)
    total = nft + tl.cdiv(W - mf, TILE)

    m_i = tl.full([G_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([G_P2], tl.float32)
    acc = tl.zeros([G_P2, BLOCK_D], tl.float32)
    for t in range(0, total):
        far = t < nft
        col = tl.where(far, t * TILE, mf + (t - nft) * TILE) + ar
        ok = col < tl.where(far, mf, W)
        kt = tl.load(kp + tl.where(far, 0, sk0) + h * sk1 + d[:, None] * sk2 + col[None, :],
                     mask=dm[:, None] & ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_D, TILE)
        qv = tl.where(far, qf, ql)
        s = tl.sum(qv[:, :, None] * kt[None, :, :], axis=1)  # (G_P2, TILE)
        pv = tl.load(pp + h * m + col, mask=ok & (col < m * hp), other=0.0)
        s = tl.where(ok[None, :], s + pv[None, :], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(vp + h * sv0 + col[:, None] * sv1 + d[None, :], mask=ok[:, None] & dm[None, :],
                     other=0.0).to(tl.float32)  # (TILE, BLOCK_D)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt[None, :, :], axis=1)
        m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    Hq = Hkv * G
    tl.store(o_ptr + (b * Hq + qh)[:, None] * D + d[None, :], o.to(o_ptr.dtype.element_ty), mask=qmask)
    tl.store(l_ptr + b * Hq + qh, lse, mask=gm)

    lse_use = tl.where(has, lse, float("inf"))  # a row with nothing to attend gets probability 0
    for t in range(0, total):
        far = t < nft
        col = tl.where(far, t * TILE, mf + (t - nft) * TILE) + ar
        ok = col < tl.where(far, mf, W)
        kt = tl.load(kp + tl.where(far, 0, sk0) + h * sk1 + d[:, None] * sk2 + col[None, :],
                     mask=dm[:, None] & ok[None, :], other=0.0).to(tl.float32)
        qv = tl.where(far, qf, ql)
        s = tl.sum(qv[:, :, None] * kt[None, :, :], axis=1)
        p = tl.exp(s - lse_use[:, None])
        p = tl.where(gm[:, None] & ok[None, :], p, 0.0)
        rec = tl.sum(p, axis=0)  # (TILE,)
        tl.store(r_ptr + b * srb + h * srh + (col - m), rec, mask=ok & (col >= m))


_kvm_jit = lazy_jit(_kvm_decode_kernel)
_NM = 9


def _tl_dtype(dt):
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dt]


def kv_memory_decode_attention_triton(q_far, q_loc, keys, values, n_blocks, n_far, pads=None, scale=1.0,
                                      return_lse=True, tile=None):
    _check(q_far, q_loc, keys, values, n_blocks, n_far, pads)
    B, Hq, D = q_far.shape
    dev = q_far.device
    check(q_far.dtype in (torch.float32, torch.float16, torch.bfloat16), f"q dtype {q_far.dtype}")
    check(q_far.stride() == q_loc.stride() and q_far.stride(2) == 1, "q_far / q_loc: equal strides, head_dim contiguous")
    hkv = keys[0].shape[1] if B else 1
    kdt = keys[0].dtype if B else q_far.dtype
    meta, kps, vps, pps = [], [], [], []
    zero = torch.zeros(1, dtype=torch.float32, device=dev)
    pads_kept = []  # keep converted pads alive until the launch
    wmax = 1
    for b in range(B):
        kb, vb = keys[b], values[b]
        check(kb.shape[1] == hkv and kb.dtype == kdt and vb.dtype == kdt, "every sequence: same Hkv and dtype")
        check(kb.stride(3) == 1 or kb.shape[3] <= 1, f"keys[{b}]: the column dim must have stride 1")
        check(vb.stride(2) == 1, f"values[{b}]: head_dim must have stride 1")
        m, f, w = int(n_blocks[b]), int(n_far[b]), kb.shape[3]
        pad = None if pads is None else pads[b]
        if pad is not None:
            pad = pad.to(device=dev, dtype=torch.float32).contiguous()
            pads_kept.append(pad)
        meta.append([w, m, f, kb.stride(0), kb.stride(1), kb.stride(2), vb.stride(0), vb.stride(1),
                     int(pad is not None)])
        kps.append(kb.data_ptr())
        vps.append(vb.data_ptr())
        pps.append((pad if pad is not None else zero).data_ptr())
        wmax = max(wmax, w - m)
    out = torch.empty(B, Hq, D, dtype=q_far.dtype, device=dev)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=dev)
    rec = torch.empty(B, hkv, wmax, dtype=torch.float32, device=dev)
    if B:
        ptrs = torch.tensor([kps, vps, pps], dtype=torch.int64).to(dev)
        mt = torch.tensor(meta, dtype=torch.int64).to(dev)
        G = Hq // hkv
        TILE = tile or 32  # (G, D, TILE) products stay in registers
        _kvm_jit()[(B * hkv,)](
            q_far, q_loc, q_far.stride(0), q_far.stride(1), ptrs[0], ptrs[1], ptrs[2], mt,
            out, lse, rec, rec.stride(0), rec.stride(1), float(scale), hkv, D,
            G=G, G_P2=max(2, triton.next_power_of_2(G)), TILE=TILE, BLOCK_D=triton.next_power_of_2(D),
            DT=_tl_dtype(kdt), NM=_NM)
    del pads_kept
    received = [rec[b, :, : keys[b].shape[3] - int(n_blocks[b])] for b in range(B)]
    return out, lse, received


# ----------------------------------------------------------------------------- dispatch
def kv_memory_decode_attention(q_far, q_loc, keys, values, n_blocks, n_far, pads=None, scale=1.0,
                               return_lse=False):
    """(out, lse, received) of one decode token per sequence over its KV memory. CUDA -> Triton, else torch."""
    if use_triton(q_far, *keys[:1]):
        return kv_memory_decode_attention_triton(q_far, q_loc, keys, values, n_blocks, n_far, pads, scale)
    return kv_memory_decode_attention_torch(q_far, q_loc, keys, values, n_blocks, n_far, pads, scale, return_lse)
