"""Linear layers: fp32 (F.linear) and int8 (per-output-channel symmetric weight scales).

Int8 cuts the bytes a decode step streams from DRAM 4x (135M params: 540 MB fp32 -> 135 MB int8),
which is what bounds single-stream decode on this CPU (~18 GB/s: fp32 ceiling ~35 tok/s for
SmolLM2-135M).

Which int8 kernel (measured on this 2-core Xeon with AVX512-VNNI, 1 thread, best of 60, µs):

    shape (N x K), rows M          fp32 F.linear   aten._weight_int8pack_mm   fbgemm linear_dynamic
    960 x 576   (qkv),   M=1            75               508                        30
    3072 x 576  (gate_up), M=1         319              1662                       120
    576 x 1536  (down),  M=1           196              1438                        44
    49152 x 576 (LM head), M=1       19132             32918                      2963
    3072 x 576, M=16                  1430             35866                       295
    3072 x 576, M=512                35521                 -                     18609

`_weight_int8pack_mm` (true weight-only) has no fast fp32-activation path on this CPU (5-25x slower
than fp32), so the int8 path is fbgemm's dynamic-quantized linear: int8 per-channel weights and
per-call uint8 activations (one scale per call, computed from the activations), int32 accumulation
with VNNI. Measured relative error vs float64 on random data: 1.3e-2 (weight rounding alone: 0.8e-2);
`reduce_range=False` (full 8-bit activations) is safe with VNNI's non-saturating vpdpbusd and
halves the error of reduce_range=True (2.0e-2). Without VNNI (AVX2's vpmaddubsw adds u8*s8 pairs in
saturating int16) full-range activations overflow: on an AVX2-only Xeon an all-ones 64-wide row gave
32.4 instead of 64 and a random 576-wide linear 2.8e-2 error (reduce_range=True: exact / 1.9e-2), and
a tiny Llama's logits were 32% off. So the range is chosen by running that all-ones probe once
(`full_range_is_exact`). Where the quantized engine is unavailable the layer falls back to
`_weight_int8pack_mm`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (w_int8 (N, K), scales (N,) fp32)."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales.contiguous()


class Linear:
    """y = x @ W^T (+ b), fp32."""

    __slots__ = ("weight", "bias", "out_features")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight.contiguous()
        self.bias = bias
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class Int8Linear:
    """int8 linear: w ≈ w_int8[n, :] * scale[n] (per output channel, symmetric).

    Kernel: fbgemm `quantized::linear_dynamic` (see the module docstring for the measurements),
    else `aten._weight_int8pack_mm`.
    """

    __slots__ = ("qweight", "scales", "bias", "out_features", "_packed", "_reduce_range")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.qweight, self.scales = quantize_int8_per_channel(weight)
        self.bias = None if bias is None else bias.float().contiguous()
        self.out_features = weight.shape[0]
        self._packed = _prepack(self.qweight, self.scales, self.bias)
        self._reduce_range = self._packed is not None and not full_range_is_exact()

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return _LINEAR_DYNAMIC(x, self._packed, self._reduce_range)
        y = torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 4


# the resolved overload: calling the OpOverloadPacket re-resolves it in Python on every call
# (~5% of a decode step in py-spy, 120 calls per token)
_LINEAR_DYNAMIC = torch.ops.quantized.linear_dynamic.default


def _prepack(qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
    """fbgemm-packed weights, or None when torch has no quantized CPU engine here."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch deprecates quantized tensors; the op is what we need
            n = qweight.shape[0]
            wq = torch._make_per_channel_quantized_tensor(qweight, scales.double(),
                                                         torch.zeros(n, dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(wq, bias)
    except (RuntimeError, AttributeError):
        return None


@functools.cache
def full_range_is_exact() -> bool:
    """Whether fbgemm's dynamic linear with full 8-bit activations (reduce_range=False) is free of
    int16 saturation on this CPU: all-ones activations and weights must give exactly K."""
    packed = _prepack(*quantize_int8_per_channel(torch.ones(8, 64)), None)
    return packed is not None and bool((_LINEAR_DYNAMIC(torch.ones(1, 64), packed, False) == 64).all())


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, quantization: str | None, *,
                int4=None, blocks=None):
    """`int4`: quant_int4.Int4Options (default ones when None); `blocks`: the GGUF Q4 blocks of the
    weight's rows (int4 takes the file's codes from them instead of re-quantizing)."""
    if quantization is None:
        return Linear(weight, bias)
    if quantization == "int8":
        return Int8Linear(weight, bias)
    if quantization == "int4":
        from .quant_int4 import Int4Options, make_int4_linear

        return make_int4_linear(weight, bias, int4 or Int4Options(), blocks)
    raise ValueError(f"quantization must be None, 'int8' or 'int4', got {quantization!r}")
