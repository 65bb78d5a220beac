"""The single-token decode step of a dense Llama-family model as one C++ call on the CPU
(kernels/cpu_decode.cpp), built on first use with torch's C++ extension builder.

Reference: `runtime/decode_step.decode_one` (the eager step, itself checked against Model.forward and
transformers) -- same formulas, and the same torch kernels for the matmuls (int4 op on bf16 activations,
fp32 `linear`), the attention reductions (bmm / softmax / baddbmm on the same views), RMSNorm's mean and
SiLU, so the logits are bit-identical to it on this project's CPU; the elementwise work between them
(RMSNorm's scaling fused with the bf16 cast of the next matmul's input, the residual add fused with the
read of the matmul's output, RoPE, SiLU*mul fused with the cast, the cache write) is plain loops over
preallocated buffers, so a layer makes ~14 torch calls from C++ instead of ~35 Python-dispatched ops.

Only int4 (`Int4Linear`, int4 kernel: decode is one row) and fp32 (`Linear`) linears are taken; int8 models
and CUDA stay on the eager step. Memory layers (issue 16): the C++ step runs the layer up to the FFN's
normed input, then calls the layer's Python FFN (runtime/ffn.py: product-key lookup, value store, lookup
stats, and the dense MLP in "parallel" mode) through a hook, and adds its output -- as Model.forward. The build needs a C++ compiler (g++; the same one
torch.compile's inductor uses); without one `native_decode_model` returns None and says why once.
"""

from __future__ import annotations

import torch

from .cpp_build import CppExtension

# -ffp-contract=off: no fused multiply-adds the eager torch kernels do not use either
_EXT = CppExtension("cpu_decode.cpp", "C++ decode step", "using the eager one",
                    ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp-simd"])
load_extension, build_error = _EXT.load, _EXT.error


def native_decode_model(model):
    """A `DecodeModel` (C++) over `model`'s weights, or None where the native step does not apply: not on the
    CPU, fp32 activations not in use, a linear other than int4 / fp32, or no compiler. Layers with a memory
    run their FFN (`L.ffn`) in Python through the step's FFN hook."""
    from memserve.runtime.quant import Linear
    from memserve.runtime.quant_int4 import Int4Linear

    if model.device != "cpu" or model.dtype != torch.float32 or model.embed.dtype != torch.float32:
        return None
    lins = step_linears(model)
    if not all(lin is None or type(lin) in (Int4Linear, Linear) for lin in lins):
        return None
    mod = load_extension()
    if mod is None:
        return None
    empty = torch.empty(0)
    ws, szs, biases, groups = [], [], [], []
    for lin in lins:
        if lin is None:  # a hooked FFN's linears: not run in C++
            ws.append(empty)
            szs.append(empty)
            groups.append(0)
            biases.append(empty)
            continue
        if isinstance(lin, Int4Linear):
            ws.append(lin.packed)
            szs.append(lin.scale_zeros)
            groups.append(lin.group)
        else:
            ws.append(lin.weight)
            szs.append(empty)
            groups.append(0)
        biases.append(empty if lin.bias is None else lin.bias)
    norms = [t for L in model.layers for t in (L.input_norm, L.post_norm)]
    dm = mod.DecodeModel(model.embed, norms, ws, szs, biases, groups, model.final_norm, model.num_heads,
                         model.num_kv_heads, model.head_dim, float(model.eps))
    attach_ffn_hook(dm, model)
    return dm


def step_linears(model) -> list:
    """The linears a C++ step runs, in its order: each layer's qkv, o, gate_up, down, then lm_head; None for a
    memory layer's gate_up / down (its FFN -- memory, or MLP + memory -- runs in Python: `attach_ffn_hook`)."""
    lins = [lin for i, L in enumerate(model.layers)
            for lin in ((L.qkv, L.o) + ((None, None) if i in model.memory_layers else (L.gate_up, L.down)))]
    return lins + [model.lm_head]


def attach_ffn_hook(step, model) -> None:
    """Let C++ step `step` (single-token or batched) call the memory layers' Python FFN slots (`L.ffn`: lookup,
    value store, stats) with their normed input."""
    if model.memory_layers:
        layers = model.layers
        step.set_ffn_hook(sorted(model.memory_layers), lambda i, x: layers[i].ffn(x))
