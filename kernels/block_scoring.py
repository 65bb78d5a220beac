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
