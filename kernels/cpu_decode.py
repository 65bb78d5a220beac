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

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

_LOCK = threading.Lock()
_STATE: dict = {}
log = logging.getLogger(__name__)


def _cpu_tag() -> str:
    """A short hash of the CPU's flags: the build uses -march=native, so a build cache shared between
    machines (a home directory, an image) must not hand one CPU's binary to another."""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the `ninja` wheel (a dependency) puts it in the venv's bin,
    which is not on PATH when the venv's python is run without activating it (`.venv/bin/python -m pytest`,
    Ray workers). Without this a machine with no system ninja silently falls back to the eager step."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def load_extension():
    """The compiled module, or None if it cannot be built here (the reason in `build_error()`)."""
    with _LOCK:
        if "mod" in _STATE or "error" in _STATE:
            return _STATE.get("mod")
        try:
            from torch.utils.cpp_extension import load

            _ninja_on_path()

            src = Path(__file__).with_name("cpu_decode.cpp")
            log.info("building the C++ decode step (first use on this machine, ~1 min)")
            # -ffp-contract=off: no fused multiply-adds the eager torch kernels do not use either
            _STATE["mod"] = load(name=f"memserve_cpu_decode_{_cpu_tag()}", sources=[str(src)],
                                 extra_cflags=["-O3", "-march=native", "-ffp-contract=off", "-fopenmp-simd"],
                                 verbose=False)
        except Exception as e:  # noqa: BLE001 - no compiler / headers: the eager step still works
            _STATE["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            log.warning("C++ decode step unavailable, using the eager one: %s", _STATE["error"])
        return _STATE.get("mod")


def build_error() -> str | None:
    return _STATE.get("error")


def native_decode_model(model):
    """A `DecodeModel` (C++) over `model`'s weights, or None where the native step does not apply: not on the
    CPU, fp32 activations not in use, a linear other than int4 / fp32, or no compiler. Layers with a memory
    run their FFN (`L.ffn`) in Python through the step's FFN hook."""
    from memserve.runtime.quant import Linear
    from memserve.runtime.quant_int4 import Int4Linear

    if model.device != "cpu" or model.dtype != torch.float32 or model.embed.dtype != torch.float32:
        return None
    hooked = sorted(model.memory_layers)  # their FFN (memory, or MLP + memory) runs in Python
    lins = [lin for i, L in enumerate(model.layers)
            for lin in ((L.qkv, L.o) + ((None, None) if i in model.memory_layers else (L.gate_up, L.down)))]
    lins.append(model.lm_head)
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
    if hooked:
        layers = model.layers
        dm.set_ffn_hook(hooked, lambda i, x: layers[i].ffn(x))
    return dm
