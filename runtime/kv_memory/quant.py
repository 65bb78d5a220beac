"""Compression of KV-memory blocks with real byte accounting: a thin adapter over the kernel op
`memserve.kernels.quantize_kv` / `dequantize_kv` (KIVI, the project's one implementation).

KIVI (Liu et al., 2024): keys are quantized *per channel* (a scale/min per channel shared by a group
of tokens, because key outliers live in fixed channels), values *per token* (a scale/min per group
of channels). What this adapter adds on top of the op:
  * the memory's block layout (NB, Hkv, bs, D) -- blocks, kv heads, tokens, channels -- at its interface;
    int codes and metadata are stored in the kernel's layout (NB, bs, Hkv, D), rows = blocks either way;
  * scale/min stored in fp16 (meta_dtype): with groups of 64 and head_dim 64, int4 blocks take 0.281x of
    fp16 KV per token (fp32 metadata: 0.31x), the issue's <= 0.3x target;
  * "none" / "fp16" modes that just store floats;
  * exact rows (optional, off by default): the keys / values of each block's few most-attended tokens
    (per KV head) kept in fp16 beside the codes and written over their dequantized rows. Attention output
    error is sum_i p_i * err_i, so the tokens that take most of a block's attention mass carry most of
    its error; exact key rows are also taken out of their per-channel group's range. 2 rows of 64 add
    0.016x fp16 KV per token. Measured: lower attention error, but not the one int4 passkey miss that
    int8 keys in a few layers fix (KVMemoryConfig.int4_int8_key_layers, ablation section 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from memserve.kernels import QuantizedKV, dequantize_kv, quantize_kv, score_blocks_exact
from memserve.kernels.kv_quant import dequant_block_heads, dequant_blocks

COMPRESSIONS = ("none", "fp16", "int8", "int4")
_BITS = {"int8": 8, "int4": 4}
_META_DTYPE = torch.float16


@dataclass(slots=True)
class QuantizedBlocks:
    """One tensor of blocks (keys or values) in the memory tier; `data` is fp32/fp16 or uint8 codes."""

    kind: str  # one of COMPRESSIONS
    data: torch.Tensor  # (NB, Hkv, bs, D) float, or (NB, bs, Hkv, D or D/2) uint8 (kernel layout)
    scale: torch.Tensor | None = None  # fp16, QuantizedKV's metadata shape
    minimum: torch.Tensor | None = None
    exact: torch.Tensor | None = None  # (NB, Hkv, r, D) fp16 rows kept exact
    exact_idx: torch.Tensor | None = None  # (NB, Hkv, r) their token positions in the block

    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        for t in (self.scale, self.minimum, self.exact, self.exact_idx):
            if t is not None:
                n += t.numel() * t.element_size()
        return n


def quantize(x: torch.Tensor, kind: str, *, per_channel: bool, group: int,
             exact_idx: torch.Tensor | None = None) -> QuantizedBlocks:
    """Compress blocks x (NB, Hkv, bs, D). per_channel=True for keys, False for values. exact_idx
    (NB, Hkv, r): token positions whose rows are kept in fp16 beside the codes (int8/int4 only)."""
    assert kind in COMPRESSIONS, f"compression must be one of {COMPRESSIONS}, got {kind!r}"
    if kind == "none":
        return QuantizedBlocks(kind, x.clone())
    if kind == "fp16":
        return QuantizedBlocks(kind, x.half())
    exact = exact_idx is not None and exact_idx.shape[-1] > 0  # (none/fp16 returned above: nothing to keep)
    xq = _fill_exact_rows(x, exact_idx, group) if exact and per_channel else x
    xk = xq.transpose(1, 2).contiguous()  # (NB, bs, Hkv, D), the kernel layout
    q = quantize_kv(xk, "k" if per_channel else "v", _BITS[kind], group, meta_dtype=_META_DTYPE)
    qb = QuantizedBlocks(kind, q.data, q.scale, q.zero)
    if exact:
        qb.exact = x.gather(2, exact_idx[..., None].expand(-1, -1, -1, x.shape[-1])).to(_META_DTYPE)
        qb.exact_idx = exact_idx.to(torch.uint8 if x.shape[2] <= 256 else torch.int16)
    return qb


def _fill_exact_rows(x: torch.Tensor, exact_idx: torch.Tensor, group: int) -> torch.Tensor:
    """Keys: per-channel groups span tokens, so rows kept exact are replaced (before quantizing) by the
    mean of the other rows of their token group -- an outlier token then no longer widens its group's
    range. Values need none of this: their groups are per token."""
    nb, h, bs, d = x.shape
    other = torch.ones(nb, h, bs, dtype=x.dtype, device=x.device).scatter_(2, exact_idx, 0)
    s = (x * other[..., None]).view(nb, h, bs // group, group, d).sum(3)
    n = other.view(nb, h, bs // group, group).sum(3, keepdim=True).clamp(min=1)
    return torch.where(other[..., None] > 0, x, (s / n).repeat_interleave(group, dim=2))


def dequantize(qb: QuantizedBlocks, idx: torch.Tensor | None, *, per_channel: bool, group: int) -> torch.Tensor:
    """fp32 blocks (n, Hkv, bs, D) for block indices idx (None = all)."""
    if qb.kind in ("none", "fp16"):
        data = qb.data if idx is None else qb.data[idx]
        return data.float() if qb.kind == "fp16" else data
    q = _kernel_view(qb, per_channel, group)
    # selected blocks: the kernels' index_select + broadcast dequant (16 of 200 blocks, 3 heads x 64 x 64,
    # one thread: 0.2-0.5 ms vs 0.6-0.9 ms of the quantizer this module used to have)
    out = (dequantize_kv(q) if idx is None else dequant_blocks(q, idx)).transpose(1, 2)  # (n, Hkv, bs, D)
    if qb.exact is not None:
        _put_exact(out, *((qb.exact, qb.exact_idx) if idx is None else (qb.exact[idx], qb.exact_idx[idx])))
    return out


def dequantize_block_heads(qb: QuantizedBlocks, ids: torch.Tensor, heads: torch.Tensor, *, per_channel: bool,
                           group: int) -> torch.Tensor:
    """fp32 (n, bs, D): block ids[i] of KV head heads[i] (n pairs), only those heads dequantized."""
    if qb.kind in ("none", "fp16"):
        data = qb.data[ids, heads]  # (NB, Hkv, bs, D) -> (n, bs, D)
        return data.float() if qb.kind == "fp16" else data
    out = dequant_block_heads(_kernel_view(qb, per_channel, group), ids, heads)
    if qb.exact is not None:
        _put_exact(out, qb.exact[ids, heads], qb.exact_idx[ids, heads])
    return out


def exact_block_scores(kq: QuantizedBlocks, q: torch.Tensor, group: int) -> torch.Tensor:
    """(Hq, NB) fp32: per query head (q (Hq, D)) and block, the max q.k over every stored key of the block
    (GQA: query head i reads KV head i // G). int8/int4 through the kernel op on the codes; the fp16 rows
    kept exact (exact_keys) join the max -- the codes at their positions hold their group's mean key, whose
    score (a mean of the other rows' scores) never exceeds the max anyway."""
    hq = q.shape[0]
    if kq.kind in ("none", "fp16"):
        hkv = kq.data.shape[1]
        qg = q.float().view(hkv, hq // hkv, -1)
        return torch.einsum("hgd,nhtd->hgnt", qg, kq.data.float()).amax(-1).reshape(hq, -1)
    s = score_blocks_exact(q, _kernel_view(kq, True, group))
    if kq.exact is not None:
        hkv = kq.exact.shape[1]
        qg = q.float().view(hkv, hq // hkv, -1)
        s = torch.maximum(s, torch.einsum("hgd,nhrd->hgnr", qg, kq.exact.float()).amax(-1).reshape(hq, -1))
    return s


def _put_exact(out: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> None:
    """Write the fp16 rows (..., r, D) over dequantized tokens out (..., bs, D) at positions pos (..., r)."""
    out.scatter_(-2, pos.long()[..., None].expand_as(rows), rows.to(out.dtype))


def _kernel_view(qb: QuantizedBlocks, per_channel: bool, group: int) -> QuantizedKV:
    """int8/int4 blocks as the kernels' QuantizedKV (no copy)."""
    bits = _BITS[qb.kind]
    head_dim = qb.data.shape[-1] * 8 // bits  # int4 packs two channels per byte
    return QuantizedKV(qb.data, qb.scale, qb.minimum, "k" if per_channel else "v", bits, group, head_dim)


def bytes_per_token_fp16(num_kv_heads: int, head_dim: int) -> int:
    """Bytes one token's K and V take in one layer at fp16 (the comparison point of the issue)."""
    return 2 * num_kv_heads * head_dim * 2
