"""CPU kernels of the memory-layer lookup (kernels/memory_cpu.cpp): the product-key selection (`pkm_select`)
and the fused gather-convert-accumulate embedding bag (`bag`) over fp32 / bf16 / fp16 / int8 rows.

Built on first use with torch's C++ extension builder, as the native decode step (kernels/cpu_decode.py);
without a compiler `load_extension()` returns None (the reason in `build_error()`) and pkm.py /
embedding_bag.py keep their torch paths. MEMSERVE_MEMORY_CPU=0 turns the kernels off (A/B runs).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

_LOCK = threading.Lock()
_STATE: dict = {}
log = logging.getLogger(__name__)


def load_extension():
    """The compiled module, or None (no compiler, or MEMSERVE_MEMORY_CPU=0)."""
    if os.environ.get("MEMSERVE_MEMORY_CPU", "1") == "0":
        return None
    mod = _STATE.get("mod")
    if mod is not None or "error" in _STATE:
        return mod
    with _LOCK:
        if "mod" in _STATE or "error" in _STATE:
            return _STATE.get("mod")
        try:
            from torch.utils.cpp_extension import load

            from .cpu_decode import _cpu_tag, _ninja_on_path

            _ninja_on_path()
            src = Path(__file__).with_name("memory_cpu.cpp")
            log.info("building the C++ memory-layer kernels (first use on this machine, ~1 min)")
            _STATE["mod"] = load(name=f"memserve_memory_cpu_{_cpu_tag()}", sources=[str(src)],
                                 extra_cflags=["-O3", "-march=native", "-fopenmp-simd"], verbose=False)
        except Exception as e:  # noqa: BLE001 - no compiler / headers: the torch paths still work
            _STATE["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            log.warning("C++ memory-layer kernels unavailable, using torch: %s", _STATE["error"])
        return _STATE.get("mod")


def build_error() -> str | None:
    return _STATE.get("error")
