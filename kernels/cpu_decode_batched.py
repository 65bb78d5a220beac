"""The batched decode step: one new token of each of B sequences through every layer of a dense
Llama-family model as one C++ call on the CPU (kernels/cpu_decode_batched.cpp), built on first use with
torch's C++ extension builder (as kernels/cpu_decode.py, whose build helpers it shares).

Reference: `Model.forward` over the same batch (DensePagedAttention); same formulas and the same linear
kernels for the same row count (fbgemm's dynamic int8 linear, the int4 op on bf16 rows for at most
`max_small_tokens` rows, fp32 `linear`), but its own loops for RMSNorm, RoPE, attention over the paged
cache (per sequence through its block table, no gather), softmax and SiLU, so the logits agree within
rounding, not bit for bit (tests/kernels/test_cpu_decode_batched.py states the tolerance).

Takes fp32, int8 (fbgemm packed weights) and int4 (with its int8 / fp32 large-call copy or none) linears;
CUDA and an int8 layer without fbgemm return None (the engine keeps Model.forward). Memory layers (issue 16):
the C++ step calls the layer's Python FFN slot (`L.ffn`) through a hook, as kernels/cpu_decode.py does.
"""

from __future__ import annotations

import torch

from .cpp_build import CppExtension
from .cpu_decode import attach_ffn_hook, step_linears

NONE, FP32, INT8, INT4 = 0, 1, 2, 3
# -fopenmp: at::parallel_for (attention, sequences over the threads) is a header template that runs its
# range inline unless the extension itself is compiled with OpenMP (-fopenmp-simd alone left the attention
# on one thread: 343 us per layer at 1 thread, 377 at 2, 16 sequences x 96 tokens). The GOMP symbols resolve
# against torch's own libgomp (a dependency of libtorch_cpu): one OpenMP runtime, torch's thread pool.
_EXT = CppExtension("cpu_decode_batched.cpp", "batched C++ decode step", "using Model.forward",
                    ["-O3", "-march=native", "-fopenmp"])
load_extension, build_error = _EXT.load, _EXT.error


def _kernel(lin):
    """(kind, weight, scale_zeros, group, bias, packed, reduce_range) of one linear kernel, or None if the
    C++ step cannot run it."""
    from memserve.runtime.quant import Int8Linear, Linear
    from memserve.runtime.quant_int4 import Int4Linear

    empty = torch.empty(0)
    bias = empty if getattr(lin, "bias", None) is None else lin.bias
    if lin is None:
        return (NONE, empty, empty, 0, empty, None, False)
    if type(lin) is Linear:
        return (FP32, lin.weight, empty, 0, bias, None, False)
    if type(lin) is Int8Linear:
        if lin._packed is None:  # no fbgemm here: its _weight_int8pack_mm fallback stays in Python
            return None
        return (INT8, empty, empty, 0, empty, lin._packed, bool(lin._reduce_range))
    if type(lin) is Int4Linear:
        return (INT4, lin.packed, lin.scale_zeros, lin.group, bias, None, False)
    return None


def native_batched_model(model):
    """A `BatchedDecodeModel` (C++) over `model`'s weights, or None where it does not apply: not on the
    CPU, not fp32 activations, a linear kind it does not run, or no compiler. Memory layers' FFNs: the hook."""
    from memserve.runtime.quant_int4 import Int4Linear

    if model.device != "cpu" or model.dtype != torch.float32 or model.embed.dtype != torch.float32:
        return None
    specs = []
    for lin in step_linears(model):
        if lin is None:  # a hooked layer's gate_up / down
            specs.append((_kernel(None), _kernel(None), 0, 0, 0))
            continue
        small = _kernel(lin)
        large, max_small = _kernel(None), 0
        if type(lin) is Int4Linear and lin.large is not None:
            large, max_small = _kernel(lin.large), lin.max_small_tokens
        if small is None or large is None or small[0] == NONE:
            return None
        specs.append((small, large, max_small, lin.out_features,
                      lin.in_features if type(lin) is Int4Linear else _in_features(lin)))
    mod = load_extension()
    if mod is None:
        return None
    norms = [t for L in model.layers for t in (L.input_norm, L.post_norm)]
    m = mod.BatchedDecodeModel(model.embed, norms, model.final_norm, model.num_heads, model.num_kv_heads,
                               model.head_dim, float(model.eps))
    for (ks, ws, szs, gs, bs, ps, rrs), (kl, wl, _, _, bl, pl, rrl), max_small, n, k in specs:
        m.add_linear(ks, ws, szs, gs, bs, ps, rrs, kl, wl, bl, pl, rrl, max_small, n, k)
    attach_ffn_hook(m, model)
    return m


def _in_features(lin) -> int:
    return lin.weight.shape[1] if hasattr(lin, "weight") else lin.qweight.shape[1]
