"""int4 weight-only linears on torch's CPU int4 op, with the kernel chosen by the rows of each call.

Format: per output row n and group of `group` input columns, 4-bit codes q in [0, 15] and
    w[n, k] = (q[n, k] - 8) * scale[n, k // g] + zero[n, k // g]
(`torch.ops.aten._weight_int4pack_mm_for_cpu`, weights packed by `_convert_weight_to_int4pack_for_cpu`,
scale/zero stored bf16 as (K/g, N, 2)). At group 32 that is llama.cpp's Q4_1 (x = d*q + m: scale = d,
zero = m + 8*d) and Q4_0 (x = d*(q - 8): scale = d, zero = 0), so GGUF Q4 blocks are unpacked with
integer ops straight into codes + scales (`codes_from_gguf`): the int4 weights are the file's codes,
no fp32 round trip and no second rounding. fp weights are group-quantized min/max like Q4_1
(`quantize_int4_groups`). The scales go through bf16 (the op's format): 2^-9 relative on d and on
m + 8d, below the 4-bit step.

The op's vectorized kernels take bf16 activations (fp32 ones fall back to scalar code), so a call is
x.bfloat16() -> op -> .float(); bf16 activations add ~2^-9 relative error per input.

Kernel by rows (measured 2026-12-03 on this session's 2-core Xeon with AVX512-BF16/AMX, 1 thread,
SmolLM2-135M's 120 layer linears, 30 distinct layers so weights stream from DRAM, best of 15, ms):

    rows T       1      2      4      8      16
    int8 fbgemm  17.1   23.2   25.1   28.6   29.9
    int4 g32     11.6   16.5   22.9   40.6   78.7
    int4 g64     17.2   16.2   21.6   43.8   77.5

The int4 op's cost grows ~linearly with T (it re-dequantizes its weights per row block) while fbgemm's
int8 GEMM amortizes, so calls with T <= `max_small_tokens` (default 4) run int4 and larger ones
(prefill, many decode streams) run a second copy: int8 (default), fp32, or none (int4 for everything,
least memory). Both copies count in `nbytes`. LM head (49152 x 576) alone, T=1: int4 3.0 ms, int8
4.0, fp32 18.3. Group 32 is the default (the Q4_1 group; g64 was no faster here, and group 128 does
not divide K = 576).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .quant import Int8Linear, Linear

GROUP_SIZES = (32, 64, 128, 256)
LARGE_KERNELS = ("int8", "fp32", "none")
_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default
_PACK = torch.ops.aten._convert_weight_to_int4pack_for_cpu.default
_GGUF_BLOCK = {"Q4_0": 18, "Q4_1": 20}  # bytes per 32 weights: f16 d [, f16 m], 16 bytes of nibbles


@dataclass(frozen=True, slots=True)
class Int4Options:
    """How `quantization="int4"` builds its linears (EngineArgs.int4_* fields)."""

    group: int = 32
    large_kernel: str = "int8"   # second copy for calls with more rows: "int8" | "fp32" | "none"
    max_small_tokens: int = 4    # calls with at most this many rows run the int4 op

    def __post_init__(self):
        if self.group not in GROUP_SIZES:
            raise ValueError(f"int4 group must be one of {GROUP_SIZES}, got {self.group!r}")
        if self.large_kernel not in LARGE_KERNELS:
            raise ValueError(f"int4 large_kernel must be one of {LARGE_KERNELS}, got {self.large_kernel!r}")
        if self.max_small_tokens < 1:
            raise ValueError(f"int4 max_small_tokens must be >= 1, got {self.max_small_tokens!r}")


@dataclass(slots=True)
class GGUFQ4Blocks:
    """A GGUF Q4_0 / Q4_1 tensor's raw blocks, kept (memory-mapped, not copied) by the GGUF reader.
    `data`: uint8 (N, K/32 * block bytes); `rotary_heads`: undo llama.cpp's q/k row permutation
    with this many heads when the codes are taken (None: rows as stored)."""

    qtype: str
    data: np.ndarray
    shape: tuple[int, int]
    rotary_heads: int | None = None


def quantize_int4_groups(w: torch.Tensor, group: int = 32):
    """w (N, K) float -> codes (N, K) uint8 in [0, 15], scale (N, K/g) fp32, zero (N, K/g) fp32, with
    w ~ (q - 8) * scale + zero (asymmetric min/max per group, as llama.cpp's Q4_1)."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 group {group} does not divide the input size {k}; use a group that does "
                         f"(one of {[g for g in GROUP_SIZES if k % g == 0] or 'none'})")
    wg = w.float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(n, k)
    return q, scale, lo + 8 * scale


def codes_from_gguf(b: GGUFQ4Blocks):
    """GGUF Q4_0/Q4_1 blocks -> (codes (N, K) uint8, scale (N, K/32), zero (N, K/32) fp32), integer ops
    only on the codes. Block j of a row holds 32 weights: byte i's low nibble is weight i, its high
    nibble weight i + 16 (ggml's block_q4_0 / block_q4_1)."""
    if b.qtype not in _GGUF_BLOCK:
        raise ValueError(f"not a Q4_0/Q4_1 tensor: {b.qtype}")
    n, k = b.shape
    bpb = _GGUF_BLOCK[b.qtype]
    raw = torch.from_numpy(np.array(b.data, copy=True).reshape(n, k // 32, bpb))  # one matrix at a time
    if b.rotary_heads is not None:
        from .gguf_reader import unpermute_rotary

        raw = unpermute_rotary(raw, b.rotary_heads)
    d = raw[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()  # (N, K/32)
    qs = raw[..., bpb - 16:]  # (N, K/32, 16)
    q = torch.cat((qs & 0xF, qs >> 4), -1).reshape(n, k)
    if b.qtype == "Q4_1":
        m = raw[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
        return q, d, m + 8 * d
    return q, d, torch.zeros_like(d)


class Int4Linear:
    """y = x @ W^T (+ b) with int4 weights for calls of <= `max_small_tokens` rows and an optional
    int8 / fp32 copy (`large`) for larger ones (see the module docstring for the measurements)."""

    __slots__ = ("packed", "scale_zeros", "group", "bias", "out_features", "in_features", "large",
                 "max_small_tokens")

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                 bias: torch.Tensor | None = None, large=None, max_small_tokens: int = 4):
        n, k = codes.shape
        if n % 16:
            raise ValueError(f"int4 linears need the output size divisible by 16, got {n}")
        if k % group or scale.shape != (n, k // group) or zero.shape != scale.shape:
            raise ValueError(f"int4 scales {tuple(scale.shape)} do not match codes {(n, k)} at group {group}")
        self.packed = _PACK(codes.to(torch.int32).contiguous(), 2)
        self.scale_zeros = torch.stack((scale, zero), -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.group, self.out_features, self.in_features = group, n, k
        self.bias = None if bias is None else bias.float().contiguous()
        self.large, self.max_small_tokens = large, max_small_tokens

    def int4(self, x: torch.Tensor) -> torch.Tensor:
        y = _MM(x.to(torch.bfloat16), self.packed, self.group, self.scale_zeros).float()
        return y if self.bias is None else y + self.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.large is not None and x.shape[0] > self.max_small_tokens:
            return self.large(x)
        return self.int4(x)

    def dequantized(self) -> torch.Tensor:
        """(N, K) fp32 weights the int4 op computes with (bf16 scales)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        # the packed layout is the op's own, so the weights are read back through the op: one nonzero
        # (1.0) per row of eye, so each output is one dequantized weight
        w = _MM(eye, self.packed, self.group, self.scale_zeros).float().T
        return w.contiguous()

    @property
    def int4_nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scale_zeros.numel() * 2

    @property
    def nbytes(self) -> int:
        extra = self.large.nbytes if self.large is not None else 0
        return self.int4_nbytes + extra + (0 if self.bias is None else self.bias.numel() * 4)


def make_int4_linear(weight: torch.Tensor | None, bias: torch.Tensor | None, opts: Int4Options,
                     blocks: list[GGUFQ4Blocks] | None = None) -> Int4Linear:
    """From GGUF Q4 blocks (row-concatenated, e.g. fused q/k/v) when given and opts.group == 32, else by
    group-quantizing `weight`. The large-call copy is built from `weight` (fp32 as loaded)."""
    if blocks and opts.group == 32:
        parts = [codes_from_gguf(b) for b in blocks]
        q, s, z = (torch.cat([p[i] for p in parts]) for i in range(3))
    else:
        q, s, z = quantize_int4_groups(weight, opts.group)
    large = None
    if opts.large_kernel != "none":
        if weight is None:
            raise ValueError("the int4 large-call copy needs the fp weights")
        large = Int8Linear(weight, bias) if opts.large_kernel == "int8" else Linear(weight, bias)
    return Int4Linear(q, s, z, opts.group, bias, large, opts.max_small_tokens)
