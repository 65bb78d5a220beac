"""Compression of KV-memory blocks (KIVI grouping) with real byte accounting.

KIVI (Liu et al., 2024): keys are quantized *per channel* (a scale/min per channel shared by a group
of tokens, because key outliers live in fixed channels), values *per token* (a scale/min per group
of channels). Asymmetric: scale = (max - min) / (2^b - 1), q = round((x - min) / scale).
Scales and minima are stored in fp16; int4 codes are packed two per byte.

Block layout everywhere in this module: (NB, Hkv, bs, D) -- blocks, kv heads, tokens, channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COMPRESSIONS = ("none", "fp16", "int8", "int4")


@dataclass(slots=True)
class QuantizedBlocks:
    """One tensor of blocks (keys or values) in the memory tier; `data` is fp32/fp16 or uint8 codes."""

    kind: str  # one of COMPRESSIONS
    data: torch.Tensor  # (NB, Hkv, bs, D) float, or (NB, Hkv, bs, D or D/2) uint8
    scale: torch.Tensor | None = None  # fp16, broadcastable group shape (see _grouped)
    minimum: torch.Tensor | None = None

    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        for t in (self.scale, self.minimum):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"data": self.data}
        if self.scale is not None:
            out["scale"] = self.scale
            out["minimum"] = self.minimum
        return out


def _grouped(x: torch.Tensor, per_channel: bool, group: int) -> torch.Tensor:
    """View x (NB, Hkv, bs, D) so that dim 3 (per_channel) or dim 4 (per token) is the group."""
    nb, h, bs, d = x.shape
    if per_channel:  # keys: a group of `group` tokens shares one (scale, min) per channel
        assert bs % group == 0, f"block_size {bs} must be a multiple of the key group {group}"
        return x.reshape(nb, h, bs // group, group, d)  # (NB, Hkv, bs/g, g, D)
    assert d % group == 0, f"head_dim {d} must be a multiple of the value group {group}"
    return x.reshape(nb, h, bs, d // group, group)  # (NB, Hkv, bs, D/g, g)


def quantize(x: torch.Tensor, kind: str, *, per_channel: bool, group: int) -> QuantizedBlocks:
    """Compress blocks x (NB, Hkv, bs, D) fp32. per_channel=True for keys, False for values."""
    assert kind in COMPRESSIONS, f"compression must be one of {COMPRESSIONS}, got {kind!r}"
    if kind == "none":
        return QuantizedBlocks(kind, x.clone())
    if kind == "fp16":
        return QuantizedBlocks(kind, x.half())
    bits = 8 if kind == "int8" else 4
    qmax = (1 << bits) - 1
    g = _grouped(x.float(), per_channel, group)
    red = 3 if per_channel else 4
    mn = g.amin(dim=red, keepdim=True).half()
    mx = g.amax(dim=red, keepdim=True).half()
    # quantize against the fp16-rounded scale/min the dequantizer will see
    scale = ((mx.float() - mn.float()) / qmax).clamp_min(1e-6).half()
    q = torch.round((g - mn.float()) / scale.float()).clamp_(0, qmax).to(torch.uint8)
    q = q.reshape(x.shape)
    if bits == 4:  # two codes per byte along the channel dim
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return QuantizedBlocks(kind, q.contiguous(), scale, mn)


def dequantize(qb: QuantizedBlocks, idx: torch.Tensor | None, *, per_channel: bool, group: int) -> torch.Tensor:
    """fp32 blocks (n, Hkv, bs, D) for block indices idx (None = all)."""
    data = qb.data if idx is None else qb.data[idx]
    if qb.kind == "none":
        return data
    if qb.kind == "fp16":
        return data.float()
    scale = qb.scale if idx is None else qb.scale[idx]
    mn = qb.minimum if idx is None else qb.minimum[idx]
    if qb.kind == "int4":
        lo, hi = data & 0x0F, data >> 4
        data = torch.stack((lo, hi), dim=-1).flatten(-2)  # (n, Hkv, bs, D)
    g = _grouped(data.float(), per_channel, group)
    return (g * scale.float() + mn.float()).reshape(data.shape)


def bytes_per_token_fp16(num_kv_heads: int, head_dim: int) -> int:
    """Bytes one token's K and V take in one layer at fp16 (the comparison point of the issue)."""
    return 2 * num_kv_heads * head_dim * 2
