"""Block scoring and top-k selection for retrieval-based KV memory.

InfLLM (Xiao et al. 2024): a block's representative is the mean key of its `repr_topk` most
attended tokens; a block scores `q . repr` with the query averaged over the heads of a GQA group
(and, when prefilling, over the chunk's tokens: score is linear in q, so average q first).
Quest (Tang et al. 2024): a page keeps per-channel key min/max; `sum_i max(q_i min_i, q_i max_i)`
upper-bounds q.k for every key in the page. Computed as q+ . max + q- . min (two matmuls, no
(B, H, C, D) temporary).

    score_blocks_infllm(q (B, Hq, D), reprs (NB, Hkv, D), cand_ids (B, C)) -> (B, Hkv, C) fp32
    score_blocks_quest(q (B, Hq, D), kmin (NB, Hkv, D), kmax (NB, Hkv, D), cand_ids (B, C)) -> (B, Hq, C) fp32
    select_topk_blocks(scores (B, H, C), cand_ids (B, C), k, num_kv_heads, shared=False,
                       group_reduce="mean") -> block_ids (B, Hkv, k) int32
cand_ids are pool block ids, -1 = padding (scores -inf). Selected ids come back sorted ascending
(better locality for the attention gather), -1 padded when fewer than k candidates are valid; they
feed `block_sparse_decode_attention` directly.
Helpers for building the per-block metadata: `block_minmax`, `block_representatives`.
"""

import torch

from ._common import check, lazy_jit, tl, triton, use_triton

__all__ = [
    "score_blocks_infllm",
    "score_blocks_quest",
    "select_topk_blocks",
    "score_blocks_infllm_ref",
    "score_blocks_quest_ref",
    "score_blocks_triton",
    "block_minmax",
    "block_representatives",
    "score_block_reprs",
    "score_block_reprs_ref",
    "score_block_reprs_torch",
    "score_block_reprs_triton",
]


def _check(q, meta, cand_ids):
    check(q.dim() == 3 and meta.dim() == 3, "q (B, Hq, D) and block metadata (NB, Hkv, D) expected")
    check(q.shape[2] == meta.shape[2] and q.shape[1] % meta.shape[1] == 0, "head_dim / GQA mismatch")
    check(cand_ids.dim() == 2 and cand_ids.shape[0] == q.shape[0], "cand_ids must be (B, C)")
    check(not cand_ids.dtype.is_floating_point, "cand_ids must be integer")


# ----------------------------------------------------------------------------- references
def score_blocks_infllm_ref(q, reprs, cand_ids):
    _check(q, reprs, cand_ids)
    B, Hq, D = q.shape
    Hkv = reprs.shape[1]
    qm = q.float().view(B, Hkv, Hq // Hkv, D).mean(2)  # (B, Hkv, D) query averaged over the group
    r = reprs.float()[cand_ids.long().clamp_min(0)]  # (B, C, Hkv, D)
    s = torch.einsum("bhd,bchd->bhc", qm, r)
    return s.masked_fill((cand_ids < 0)[:, None, :], float("-inf"))


def score_blocks_quest_ref(q, kmin, kmax, cand_ids):
    _check(q, kmin, cand_ids)
    B, Hq, D = q.shape
    Hkv = kmin.shape[1]
    G = Hq // Hkv
    c = cand_ids.long().clamp_min(0)
    qf = q.float().view(B, Hkv, G, 1, D)
    lo = kmin.float()[c].permute(0, 2, 1, 3).unsqueeze(2)  # (B, Hkv, 1, C, D)
    hi = kmax.float()[c].permute(0, 2, 1, 3).unsqueeze(2)
    s = torch.maximum(qf * lo, qf * hi).sum(-1).reshape(B, Hq, -1)  # (B, Hq, C)
    return s.masked_fill((cand_ids < 0)[:, None, :], float("-inf"))


# ----------------------------------------------------------------------------- torch paths
def _score_infllm_torch(q, reprs, cand_ids):
    _check(q, reprs, cand_ids)
    B, Hq, D = q.shape
    Hkv = reprs.shape[1]
    qm = q.float().view(B, Hkv, Hq // Hkv, D).mean(2)  # (B, Hkv, D)
    r = reprs[cand_ids.long().clamp_min(0)].float().permute(0, 2, 3, 1)  # (B, Hkv, D, C)
    s = torch.matmul(qm.unsqueeze(2), r).squeeze(2)  # (B, Hkv, C)
    return s.masked_fill((cand_ids < 0)[:, None, :], float("-inf"))


def _score_quest_torch(q, kmin, kmax, cand_ids):
    _check(q, kmin, cand_ids)
    B, Hq, D = q.shape
    Hkv = kmin.shape[1]
    G = Hq // Hkv
    c = cand_ids.long().clamp_min(0)
    qf = q.float().view(B, Hkv, G, D)
    lo = kmin[c].float().permute(0, 2, 3, 1)  # (B, Hkv, D, C)
    hi = kmax[c].float().permute(0, 2, 3, 1)
    # max(q*lo, q*hi) = q+ * hi + q- * lo  (per channel, since lo <= hi)
    s = torch.matmul(qf.clamp_min(0), hi) + torch.matmul(qf.clamp_max(0), lo)  # (B, Hkv, G, C)
    return s.reshape(B, Hq, -1).masked_fill((cand_ids < 0)[:, None, :], float("-inf"))


# ----------------------------------------------------------------------------- triton
def _score_kernel(q_ptr, a_ptr, b_ptr, c_ptr, o_ptr, C, D, Hkv,
                  sqb, sqh, san, sah, sad, scb, scc,
                  G: tl.constexpr, G_P2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                  QUEST: tl.constexpr):
    # program (b * Hkv + h, chunk of BLOCK_C candidates). InfLLM: one row (mean of the group's
    # queries) -> out (B, Hkv, C). Quest: G rows -> out (B, Hq, C).
    pid = tl.program_id(0)
    b = pid // Hkv
    h = pid % Hkv
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.arange(0, BLOCK_D)
    g = tl.arange(0, G_P2)
    cm = cc < C
    dm = d < D
    ids = tl.load(c_ptr + b * scb + cc * scc, mask=cm, other=-1)
    ok = cm & (ids >= 0)
    qv = tl.load(q_ptr + b * sqb + (h * G + g)[:, None] * sqh + d[None, :], mask=(g < G)[:, None] & dm[None, :],
                 other=0.0).to(tl.float32)  # (G_P2, BLOCK_D)
    off = ids[:, None] * san + h * sah + d[None, :] * sad
    m2 = ok[:, None] & dm[None, :]
    a = tl.load(a_ptr + off, mask=m2, other=0.0).to(tl.float32)  # reprs or kmin (BLOCK_C, BLOCK_D)
    if QUEST:
        hi = tl.load(b_ptr + off, mask=m2, other=0.0).to(tl.float32)
        s = tl.sum(tl.maximum(qv[:, None, :] * a[None, :, :], qv[:, None, :] * hi[None, :, :]), axis=2)
        s = tl.where(ok[None, :], s, float("-inf"))  # (G_P2, BLOCK_C)
        Hq = Hkv * G
        tl.store(o_ptr + (b * Hq + h * G + g)[:, None] * C + cc[None, :], s, mask=(g < G)[:, None] & cm[None, :])
    else:
        qm = tl.sum(qv, axis=0) / G  # (BLOCK_D,)
        s = tl.sum(a * qm[None, :], axis=1)
        s = tl.where(ok, s, float("-inf"))
        tl.store(o_ptr + (b * Hkv + h) * C + cc, s, mask=cm)


_score_jit = lazy_jit(_score_kernel)


def score_blocks_triton(q, a, b, cand_ids, quest: bool):
    """Launcher for both scores: `a` = reprs (InfLLM) or kmin (Quest), `b` = kmax (Quest) or None."""
    _check(q, a, cand_ids)
    check(q.stride(2) == 1, "q head_dim must be contiguous")
    if quest:
        check(b is not None and b.shape == a.shape and b.stride() == a.stride(), "kmax must match kmin")
    B, Hq, D = q.shape
    Hkv = a.shape[1]
    G = Hq // Hkv
    C = cand_ids.shape[1]
    out = torch.empty(B, Hq if quest else Hkv, C, dtype=torch.float32, device=q.device)
    if C == 0:
        return out
    BLOCK_C = min(16, triton.next_power_of_2(C))  # (G, BLOCK_C, D) products stay in registers
    _score_jit()[(B * Hkv, triton.cdiv(C, BLOCK_C))](
        q, a, b if quest else a, cand_ids, out, C, D, Hkv, q.stride(0), q.stride(1), *a.stride(),
        *cand_ids.stride(), G=G, G_P2=max(2, triton.next_power_of_2(G)), BLOCK_C=BLOCK_C,
        BLOCK_D=triton.next_power_of_2(D), QUEST=quest)
    return out


# ----------------------------------------------------------------------------- dispatch
def score_blocks_infllm(q, reprs, cand_ids):
    """(B, Hkv, C) fp32: mean-over-group query . representative, -inf for padded candidates."""
    if use_triton(q, reprs):
        return score_blocks_triton(q, reprs, None, cand_ids, quest=False)
    return _score_infllm_torch(q, reprs, cand_ids)


def score_blocks_quest(q, kmin, kmax, cand_ids):
    """(B, Hq, C) fp32 Quest upper bound per query head, -inf for padded candidates."""
    if use_triton(q, kmin):
        return score_blocks_triton(q, kmin, kmax, cand_ids, quest=True)
    return _score_quest_torch(q, kmin, kmax, cand_ids)


def select_topk_blocks(scores, cand_ids, k, num_kv_heads, shared=False, group_reduce="mean"):
    """Top-k candidate blocks per (sequence, KV head) -> block ids (B, Hkv, k) int32 sorted, -1 padded.

    scores (B, H, C) with H = Hkv (InfLLM) or Hq (Quest; the group of a KV head is reduced with
    `group_reduce` "mean" | "max" - "max" keeps Quest's bound a bound for the whole group).
    shared=True: one selection per sequence from the scores summed over KV heads (InfLLM's
    query averaged over all heads of the layer), repeated for every KV head.
    torch.topk on every device (a k <= 64 selection over C <= a few thousand is latency-bound
    either way; the scores are the memory-bound part and have a Triton kernel).
    """
    check(scores.dim() == 3 and cand_ids.shape == (scores.shape[0], scores.shape[2]), "scores (B, H, C)")
    check(scores.shape[1] % num_kv_heads == 0, "H must be a multiple of num_kv_heads")
    check(group_reduce in ("mean", "max"), "group_reduce must be 'mean' or 'max'")
    B, H, C = scores.shape
    s = scores.float().view(B, num_kv_heads, H // num_kv_heads, C)
    s = s.mean(2) if group_reduce == "mean" else s.amax(2)  # (B, Hkv, C); -inf stays -inf
    if shared:
        s = s.sum(1, keepdim=True)  # (B, 1, C)
    kk = min(k, C)
    ids = torch.full((B, s.shape[1], k), -1, dtype=torch.int32, device=scores.device)
    if kk > 0:
        val, pos = torch.topk(s, kk, dim=-1)  # (B, h, kk)
        sel = torch.gather(cand_ids.long()[:, None, :].expand(B, s.shape[1], C), 2, pos)
        sel = torch.where(torch.isinf(val) & (val < 0), torch.full_like(sel, -1), sel)
        # ascending ids, -1 (invalid) last
        key = torch.where(sel < 0, torch.full_like(sel, torch.iinfo(torch.int64).max), sel)
        sel = torch.gather(sel, 2, key.argsort(dim=-1))
        ids[..., :kk] = sel.int()
    return ids.expand(B, num_kv_heads, k).contiguous() if shared else ids


def block_minmax(k_blocks, block_lens=None):
    """Quest page metadata: per-channel key (min, max) of each block, each (N, H, D) fp32.
    block_lens (N,) limits partially filled blocks (padding rows ignored)."""
    kf = k_blocks.float()
    if block_lens is None:
        return kf.amin(1), kf.amax(1)
    pad = (torch.arange(kf.shape[1], device=kf.device)[None, :] >= block_lens.to(kf.device)[:, None])
    pad = pad[:, :, None, None]
    return kf.masked_fill(pad, float("inf")).amin(1), kf.masked_fill(pad, float("-inf")).amax(1)


def block_representatives(k_blocks, token_scores, topk=4):
    """InfLLM representative keys: mean of the `topk` keys with the highest attention received.
    k_blocks (N, BS, H, D), token_scores (N, BS, H) (e.g. attention summed over the queries that saw
    the block) -> (N, H, D) fp32."""
    N, BS, H, D = k_blocks.shape
    kk = min(topk, BS)
    idx = token_scores.float().topk(kk, dim=1).indices  # (N, kk, H)
    sel = torch.gather(k_blocks.float(), 1, idx[..., None].expand(N, kk, H, D))  # (N, kk, H, D)
    return sel.mean(1)


# ----------------------------------------------------------------------------- KV memory (ragged)
# The retrieval KV memory (runtime/kv_memory) keeps each sequence's block metadata column-major,
# reprs (Hkv, D, NB_b, R): "mean" R = 1 mean key, "max" R most-attended keys (score = their max),
# "quest" R = 2 (per-channel min, max). One call scores every sequence of a step (ragged NB_b).
REPR_MODES = ("mean", "max", "quest")


def _check_reprs(q, reprs, mode):
    check(q.dim() == 3, f"q must be (B, Hq, D), got {tuple(q.shape)}")
    check(mode in REPR_MODES, f"mode must be one of {REPR_MODES}, got {mode!r}")
    check(len(reprs) == q.shape[0], f"reprs: one tensor per sequence ({q.shape[0]}) expected")
    for b, r in enumerate(reprs):
        check(r.dim() == 4 and r.shape[1] == q.shape[2] and q.shape[1] % r.shape[0] == 0,
              f"reprs[{b}] must be (Hkv, D, NB, R) with D = {q.shape[2]} and Hq a multiple of Hkv")
        check(mode != "quest" or r.shape[3] == 2, f"reprs[{b}]: quest metadata has R = 2 (min, max)")


def score_block_reprs_ref(q, reprs, mode):
    """float64, explicit per (sequence, query head, block)."""
    _check_reprs(q, reprs, mode)
    out = []
    for b, r in enumerate(reprs):
        hkv, _, nb, _ = r.shape
        g = q.shape[1] // hkv
        rr = r.double().cpu()
        s = torch.empty(q.shape[1], nb, dtype=torch.float64)
        for i in range(q.shape[1]):
            qi = q[b, i].double().cpu()
            for n in range(nb):
                x = rr[i // g, :, n]  # (D, R)
                if mode == "quest":
                    s[i, n] = torch.maximum(qi * x[:, 0], qi * x[:, 1]).sum()
                else:
                    s[i, n] = (qi @ x).max()
        out.append(s)
    return out


def score_block_reprs_torch(q, reprs, mode):
    """Per sequence: one bmm of the GQA group's query rows against its column-major reprs (no permuting
    copy), max over R; Quest as q+ . max + q- . min. In q's dtype (the memory's own dtype)."""
    _check_reprs(q, reprs, mode)
    hq, d = q.shape[1:]
    out = []
    for b, r in enumerate(reprs):
        hkv, _, nb, R = r.shape
        g = hq // hkv
        r = r.to(q.dtype)
        qg = q[b].reshape(hkv, g, d)  # (Hkv, G, D)
        if mode == "quest":
            lo, hi = r[..., 0], r[..., 1]  # (Hkv, D, NB)
            s = torch.bmm(qg.clamp_min(0), hi) + torch.bmm(qg.clamp_max(0), lo)
        else:
            s = torch.bmm(qg, r.reshape(hkv, d, nb * R)).view(hkv, g, nb, R).amax(-1)  # (Hkv, G, NB)
        out.append(s.reshape(hq, nb))
    return out


def _score_reprs_kernel(q_ptr, sqb, sqh, rp_ptr, meta_ptr, o_ptr, sob, soh, Hkv, D, R,
                        G: tl.constexpr, G_P2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                        DT: tl.constexpr, QUEST: tl.constexpr):
    # program (b * Hkv + h, chunk of BLOCK_C blocks): the G query heads of KV head h of sequence b
    # against its reprs, reached through a 64-bit base pointer; meta row b: [NB, head, d, block strides]
    pid = tl.program_id(0)
    b = pid // Hkv
    h = pid % Hkv
    nb = tl.load(meta_ptr + b * 4)
    s0 = tl.load(meta_ptr + b * 4 + 1)
    s1 = tl.load(meta_ptr + b * 4 + 2)
    s2 = tl.load(meta_ptr + b * 4 + 3)
    rp = tl.load(rp_ptr + b).to(tl.pointer_type(DT))
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.arange(0, BLOCK_D)
    g = tl.arange(0, G_P2)
    gm = g < G
    dm = d < D
    cm = cc < nb
    qv = tl.load(q_ptr + b * sqb + (h * G + g)[:, None] * sqh + d[None, :], mask=gm[:, None] & dm[None, :],
                 other=0.0).to(tl.float32)  # (G_P2, BLOCK_D)
    off = rp + h * s0 + d[:, None] * s1 + cc[None, :] * s2  # (BLOCK_D, BLOCK_C), + r
    m2 = dm[:, None] & cm[None, :]
    if QUEST:
        lo = tl.load(off, mask=m2, other=0.0).to(tl.float32)
        hi = tl.load(off + 1, mask=m2, other=0.0).to(tl.float32)
        s = tl.sum(tl.maximum(qv[:, :, None] * lo[None, :, :], qv[:, :, None] * hi[None, :, :]), axis=1)
    else:
        s = tl.full([G_P2, BLOCK_C], float("-inf"), tl.float32)
        for r in range(0, R):
            x = tl.load(off + r, mask=m2, other=0.0).to(tl.float32)
            s = tl.maximum(s, tl.sum(qv[:, :, None] * x[None, :, :], axis=1))
    tl.store(o_ptr + b * sob + (h * G + g)[:, None] * soh + cc[None, :], s, mask=gm[:, None] & cm[None, :])


_score_reprs_jit = lazy_jit(_score_reprs_kernel)


def score_block_reprs_triton(q, reprs, mode):
    """One launch for every sequence: fp32 (Hq, NB_b) views of a (B, Hq, max NB) buffer."""
    _check_reprs(q, reprs, mode)
    check(q.stride(2) == 1, "q head_dim must be contiguous")
    B, Hq, D = q.shape
    nbmax = max([r.shape[2] for r in reprs] + [1])
    out = torch.empty(B, Hq, nbmax, dtype=torch.float32, device=q.device)
    if B:
        hkv, R, dt = reprs[0].shape[0], reprs[0].shape[3], reprs[0].dtype
        for b, r in enumerate(reprs):
            check(r.shape[0] == hkv and r.shape[3] == R and r.dtype == dt, "every sequence: same Hkv, R, dtype")
            check(r.stride(3) == 1 or R == 1, f"reprs[{b}]: R must be the contiguous dim")
        check(dt in (torch.float32, torch.float16, torch.bfloat16), f"reprs dtype {dt}")
        meta = torch.tensor([[r.shape[2], r.stride(0), r.stride(1), r.stride(2)] for r in reprs],
                            dtype=torch.int64).to(q.device)
        ptrs = torch.tensor([r.data_ptr() for r in reprs], dtype=torch.int64).to(q.device)
        G = Hq // hkv
        BLOCK_C = min(32, triton.next_power_of_2(nbmax))
        tdt = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dt]
        _score_reprs_jit()[(B * hkv, triton.cdiv(nbmax, BLOCK_C))](
            q, q.stride(0), q.stride(1), ptrs, meta, out, out.stride(0), out.stride(1), hkv, D, R,
            G=G, G_P2=max(2, triton.next_power_of_2(G)), BLOCK_C=BLOCK_C, BLOCK_D=triton.next_power_of_2(D),
            DT=tdt, QUEST=mode == "quest")
    return [out[b, :, : r.shape[2]] for b, r in enumerate(reprs)]


def score_block_reprs(q, reprs, mode):
    """Per-query-head block scores of a ragged batch: q (B, Hq, D) (the query the memory blocks are
    attended with), reprs B tensors (Hkv, D, NB_b, R) -> B tensors (Hq, NB_b). CUDA -> Triton, else torch."""
    if use_triton(q, *reprs[:1]):
        return score_block_reprs_triton(q, reprs, mode)
    return score_block_reprs_torch(q, reprs, mode)
