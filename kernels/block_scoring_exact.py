"""Exact block scoring on quantized keys: each block scores the max of q.k over ALL its stored keys.

Why: a block's representatives are the keys that received the most attention while in the window; in
varied text nothing attends a needle before the question, so its block scores like filler. Scoring every
stored key finds 4 of 6 tuned 16k cells where the representatives find 0 (bench/results/
kv_memory_retrieval_16k.md). Computed on the codes, with no dequantized copy of the keys: keys are
quantized per channel (KIVI; kernels/kv_quant.py), k[t, c] = code[t, c] * s[g(t), c] + z[g(t), c] for the
token group g(t), so

    q . k[t] = sum_c (q_c s[g, c]) code[t, c]  +  sum_c q_c z[g, c]

-- the query is scaled per group (Hq x D numbers per group), the codes enter the product unchanged.

    score_blocks_exact(q (Hq, D), keys QuantizedKV kind "k" (NB, BS, Hkv, D), int8/int4) -> (Hq, NB) fp32
    score_blocks_exact_ref   float64, from the dequantized keys (dequantize_kv_ref)
    score_blocks_exact_torch CPU path: blocks in chunks (bounded working memory), int4 nibbles against the
                             even / odd channels of the scaled query (no interleaving copy)
    score_blocks_exact_triton one program per (block, KV head), codes unpacked in registers
Query head i reads KV head i // (Hq / Hkv) (GQA).
"""

import torch

from ._common import check, lazy_jit, tl, triton, use_triton
from .kv_quant import QuantizedKV, dequantize_kv_ref

__all__ = ["score_blocks_exact", "score_blocks_exact_ref", "score_blocks_exact_torch", "score_blocks_exact_triton"]


def _check(q: torch.Tensor, keys: QuantizedKV):
    check(isinstance(keys, QuantizedKV) and keys.kind == "k", "keys must be a QuantizedKV of kind 'k' (per channel)")
    check(q.dim() == 2 and q.shape[1] == keys.head_dim, f"q must be (Hq, D = {keys.head_dim}), got {tuple(q.shape)}")
    check(q.shape[0] % keys.num_kv_heads == 0, "Hq must be a multiple of the keys' Hkv")


def score_blocks_exact_ref(q: torch.Tensor, keys: QuantizedKV) -> torch.Tensor:
    """float64 (Hq, NB): max over tokens of q . dequantized key, per query head and block."""
    _check(q, keys)
    k = dequantize_kv_ref(keys).double().cpu()  # (NB, BS, Hkv, D)
    g = q.shape[0] // keys.num_kv_heads
    qd = q.double().cpu()
    out = torch.empty(q.shape[0], k.shape[0], dtype=torch.float64)
    for i in range(q.shape[0]):
        out[i] = (k[:, :, i // g] @ qd[i]).amax(1)
    return out


def score_blocks_exact_torch(q: torch.Tensor, keys: QuantizedKV, chunk: int = 128) -> torch.Tensor:
    """(Hq, NB) fp32 on the codes; `chunk` blocks at a time keep the fp32 codes to chunk x BS x Hkv x D."""
    _check(q, keys)
    nb, bs, hkv, d = keys.shape
    hq = q.shape[0]
    g, grp = hq // hkv, keys.group
    ng = -(-bs // grp)
    qf = q.float().view(hkv, g, d)
    out = torch.empty(hkv, g, nb, dtype=torch.float32, device=q.device)
    for a in range(0, nb, chunk):
        b = min(nb, a + chunk)
        n = b - a
        s, z = keys.scale[a:b].float(), keys.zero[a:b].float()  # (n, ng, Hkv, D)
        qs = s[:, :, :, None, :] * qf  # (n, ng, Hkv, G, D): the query scaled per token group
        bias = (z[:, :, :, None, :] * qf).sum(-1)  # (n, ng, Hkv, G)
        data = keys.data[a:b]
        if ng * grp != bs:  # a short last group: pad with code 0 (its scores are masked below)
            data = torch.cat((data, data.new_zeros((n, ng * grp - bs, *data.shape[2:]))), 1)
        data = data.view(n, ng, grp, hkv, -1).permute(0, 1, 3, 2, 4)  # (n, ng, Hkv, grp, D or D/2)

        def codes(x):
            return x.to(torch.float32, memory_format=torch.contiguous_format)

        def qt(x):  # (n, ng, Hkv, D', G) contiguous: a strided query operand made the batched matmul 6x
            return x.transpose(-1, -2).contiguous()  # slower (16 vs 2.5 ms, 503 blocks, one thread)

        if keys.bits == 8:
            sc = codes(data) @ qt(qs)
        else:  # low nibble = channel 2j, high = 2j + 1
            sc = codes(data & 0xF) @ qt(qs[..., 0::2])
            sc += codes(data >> 4) @ qt(qs[..., 1::2])
        sc += bias[:, :, :, None, :]  # (n, ng, Hkv, grp, G)
        if ng * grp != bs:
            sc[:, -1, :, bs - (ng - 1) * grp :] = float("-inf")
        out[:, :, a:b] = sc.amax(3).amax(1).permute(1, 2, 0)
    return out.view(hq, nb)


def _exact_kernel(q_ptr, d_ptr, s_ptr, z_ptr, o_ptr, NB, BS, Hkv, D, DD, NG, GRP,
                  G: tl.constexpr, G_P2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                  INT4: tl.constexpr):
    # program (block n, KV head h): its G query heads against every token of the block, group by group.
    # codes (NB, BS, Hkv, DD) uint8, scale / zero (NB, NG, Hkv, D); out (Hq, NB) fp32
    n = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.arange(0, G_P2)
    d = tl.arange(0, BLOCK_D)
    gm, dm = g < G, d < D
    qv = tl.load(q_ptr + (h * G + g)[:, None] * D + d[None, :], mask=gm[:, None] & dm[None, :],
                 other=0.0).to(tl.float32)  # (G_P2, BLOCK_D)
    best = tl.full([G_P2], float("-inf"), tl.float32)
    t = tl.arange(0, BLOCK_T)
    for gi in range(0, NG):
        moff = ((n * NG + gi) * Hkv + h) * D + d
        sv = tl.load(s_ptr + moff, mask=dm, other=0.0).to(tl.float32)
        zv = tl.load(z_ptr + moff, mask=dm, other=0.0).to(tl.float32)
        qs = qv * sv[None, :]  # (G_P2, BLOCK_D)
        bias = tl.sum(qv * zv[None, :], axis=1)  # (G_P2,)
        for t0 in range(0, GRP, BLOCK_T):
            tt = gi * GRP + t0 + t
            tm = (t0 + t < GRP) & (tt < BS)
            if INT4:
                byte = tl.load(d_ptr + ((n * BS + tt[:, None]) * Hkv + h) * DD + d[None, :] // 2,
                               mask=tm[:, None] & dm[None, :], other=0)
                c = ((byte >> ((d[None, :] % 2) * 4).to(tl.uint8)) & 0xF).to(tl.float32)
            else:
                c = tl.load(d_ptr + ((n * BS + tt[:, None]) * Hkv + h) * DD + d[None, :],
                            mask=tm[:, None] & dm[None, :], other=0).to(tl.float32)  # (BLOCK_T, BLOCK_D)
            sc = tl.sum(qs[:, None, :] * c[None, :, :], axis=2) + bias[:, None]  # (G_P2, BLOCK_T)
            sc = tl.where(tm[None, :], sc, float("-inf"))
            best = tl.maximum(best, tl.max(sc, axis=1))
    tl.store(o_ptr + (h * G + g) * NB + n, best, mask=gm)


_exact_jit = lazy_jit(_exact_kernel)


def score_blocks_exact_triton(q: torch.Tensor, keys: QuantizedKV) -> torch.Tensor:
    _check(q, keys)
    nb, bs, hkv, d = keys.shape
    hq = q.shape[0]
    out = torch.empty(hq, nb, dtype=torch.float32, device=q.device)
    if nb:
        q = q.float().contiguous()
        data, s, z = keys.data.contiguous(), keys.scale.contiguous(), keys.zero.contiguous()
        g = hq // hkv
        _exact_jit()[(nb, hkv)](q, data, s, z, out, nb, bs, hkv, d, data.shape[-1], s.shape[1], keys.group,
                                G=g, G_P2=max(2, triton.next_power_of_2(g)), BLOCK_T=16,
                                BLOCK_D=triton.next_power_of_2(d), INT4=keys.bits == 4)
    return out


def score_blocks_exact(q: torch.Tensor, keys: QuantizedKV) -> torch.Tensor:
    """(Hq, NB) fp32 exact block scores on quantized keys. CUDA -> Triton, else torch."""
    if use_triton(q, keys.data):
        return score_blocks_exact_triton(q, keys)
    return score_blocks_exact_torch(q, keys)

