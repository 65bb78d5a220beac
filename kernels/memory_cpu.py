"""CPU kernels of the memory-layer lookup (kernels/memory_cpu.cpp): the product-key selection (`pkm_select`)
and the fused gather-convert-accumulate embedding bag (`bag`) over fp32 / bf16 / fp16 / int8 rows.

Built on first use with torch's C++ extension builder, as the native decode step (kernels/cpu_decode.py);
without a compiler `load_extension()` returns None (the reason in `build_error()`) and pkm.py /
embedding_bag.py keep their torch paths. MEMSERVE_MEMORY_CPU=0 turns the kernels off (A/B runs).
"""

from __future__ import annotations

from .cpp_build import CppExtension

# -fopenmp, not only -fopenmp-simd: at::parallel_for (selection rows, bag tokens) runs its range inline unless the
# extension is compiled with OpenMP (kernels/cpu_decode_batched.py measured it)
_EXT = CppExtension("memory_cpu.cpp", "C++ memory-layer kernels", "using torch",
                    ["-O3", "-march=native", "-fopenmp"], off_env="MEMSERVE_MEMORY_CPU")
load_extension, build_error = _EXT.load, _EXT.error


def extension_for(t):
    """The compiled kernels where they apply to tensor `t` (on the CPU, built, not switched off), else None."""
    return load_extension() if t.device.type == "cpu" else None
