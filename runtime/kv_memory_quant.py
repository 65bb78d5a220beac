"""Compression of KV-memory blocks with real byte accounting: a thin adapter over the kernel op
`memserve.kernels.quantize_kv` / `dequantize_kv` (KIVI, the project's one implementation).

KIVI (Liu et al., 2024): keys are quantized *per channel* (a scale/min per channel shared by a group
of tokens, because key outliers live in fixed channels), values *per token* (a scale/min per group
of channels). What this adapter adds on top of the op:
  * the memory's block layout (NB, Hkv, bs, D) -- blocks, kv heads, tokens, channels -- at its interface;
    int codes and metadata are stored in the kernel's layout (NB, bs, Hkv, D), rows = blocks either way;
  * scale/min stored in fp16 (meta_dtype): with groups of 64 and head_dim 64, int4 blocks take 0.281x of
    fp16 KV per token (fp32 metadata: 0.31x), the issue's <= 0.3x target;
  * "none" / "fp16" modes that just store floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from memserve.kernels import QuantizedKV, dequantize_kv, quantize_kv
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

    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        for t in (self.scale, self.minimum):
            if t is not None:
                n += t.numel() * t.element_size()
        return n


def quantize(x: torch.Tensor, kind: str, *, per_channel: bool, group: int) -> QuantizedBlocks:
    """Compress blocks x (NB, Hkv, bs, D). per_channel=True for keys, False for values."""
    assert kind in COMPRESSIONS, f"compression must be one of {COMPRESSIONS}, got {kind!r}"
    if kind == "none":
        return QuantizedBlocks(kind, x.clone())
    if kind == "fp16":
        return QuantizedBlocks(kind, x.half())
    xk = x.transpose(1, 2).contiguous()  # (NB, bs, Hkv, D), the kernel layout
    q = quantize_kv(xk, "k" if per_channel else "v", _BITS[kind], group, meta_dtype=_META_DTYPE)
    return QuantizedBlocks(kind, q.data, q.scale, q.zero)


def dequantize(qb: QuantizedBlocks, idx: torch.Tensor | None, *, per_channel: bool, group: int) -> torch.Tensor:
    """fp32 blocks (n, Hkv, bs, D) for block indices idx (None = all)."""
    if qb.kind in ("none", "fp16"):
        data = qb.data if idx is None else qb.data[idx]
        return data.float() if qb.kind == "fp16" else data
    q = _kernel_view(qb, per_channel, group)
    # selected blocks: the kernels' index_select + broadcast dequant (16 of 200 blocks, 3 heads x 64 x 64,
    # one thread: 0.2-0.5 ms vs 0.6-0.9 ms of the quantizer this module used to have)
    out = dequantize_kv(q) if idx is None else dequant_blocks(q, idx)  # (n, bs, Hkv, D)
    return out.transpose(1, 2)  # (n, Hkv, bs, D)


def dequantize_block_heads(qb: QuantizedBlocks, ids: torch.Tensor, heads: torch.Tensor, *, per_channel: bool,
                           group: int) -> torch.Tensor:
    """fp32 (n, bs, D): block ids[i] of KV head heads[i] (n pairs), only those heads dequantized."""
    if qb.kind in ("none", "fp16"):
        data = qb.data[ids, heads]  # (NB, Hkv, bs, D) -> (n, bs, D)
        return data.float() if qb.kind == "fp16" else data
    return dequant_block_heads(_kernel_view(qb, per_channel, group), ids, heads)


def _kernel_view(qb: QuantizedBlocks, per_channel: bool, group: int) -> QuantizedKV:
    """int8/int4 blocks as the kernels' QuantizedKV (no copy)."""
    bits = _BITS[qb.kind]
    head_dim = qb.data.shape[-1] * 8 // bits  # int4 packs two channels per byte
    return QuantizedKV(qb.data, qb.scale, qb.minimum, "k" if per_channel else "v", bits, group, head_dim)


def bytes_per_token_fp16(num_kv_heads: int, head_dim: int) -> int:
    """Bytes one token's K and V take in one layer at fp16 (the comparison point of the issue)."""
    return 2 * num_kv_heads * head_dim * 2
