"""Small helpers shared by the kernel modules (no state, no globals carrying metadata)."""

from __future__ import annotations

import threading

import torch

try:  # triton is a hard dependency, but keep `import memserve.kernels` working without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

__all__ = ["triton", "tl", "use_triton", "lazy_jit", "next_pow2", "check", "workspace"]

_WORKSPACE = threading.local()


def workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat scratch buffer reused across calls (per thread, dtype and device), grown on demand. The
    torch paths write logits into it in place: a fresh (Hkv, G*T, n) tensor per layer is mmap'ed and
    page-faulted on every call (the KV memory's chunk attention measured 2.7x faster with it)."""
    bufs = _WORKSPACE.__dict__.setdefault("bufs", {})
    # one buffer per inference-mode state too: a buffer made under torch.inference_mode (the engine) is an
    # inference tensor, which in-place writes outside that mode (tests, probes) may not touch
    key = (dtype, device, torch.is_inference_mode_enabled())
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def use_triton(*tensors: torch.Tensor) -> bool:
    """Dispatch rule of the package: CUDA tensors go to Triton, everything else to torch."""
    return triton is not None and all(t.is_cuda for t in tensors)


def lazy_jit(fn):
    """Decorate `fn` with `triton.jit` on first use instead of at import, once per mode.

    `triton.jit` decides at decoration time whether a kernel is compiled or interpreted
    (`TRITON_INTERPRET=1`). Decorating lazily, keyed by the current mode, lets a test set the
    variable after `memserve.kernels` was imported by another test in the same session.
    """
    cache: dict = {}

    def get():
        mode = bool(triton.knobs.runtime.interpret)
        if mode not in cache:
            cache[mode] = triton.jit(fn)
        return cache[mode]

    get.__name__ = fn.__name__
    return get


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check(cond: bool, msg: str) -> None:
    """Launcher assertion that survives `python -O` (shape/stride/dtype contracts)."""
    if not cond:
        raise ValueError(msg)


class OnlineSoftmax:
    """Streaming softmax-weighted sum for the torch paths: absorb (scores, values) chunks, get
    (out, lse). Lets a path gather KV in cache-sized chunks instead of materializing it all
    (the gathered copy is then read from cache, so DRAM sees the KV bytes about once).

    scores (..., R) fp32, values (..., R, D); leading dims fixed at construction.
    """

    __slots__ = ("m", "l", "acc")

    def __init__(self, lead_shape, D, device, dtype=torch.float32):
        self.m = torch.full((*lead_shape, 1), float("-inf"), dtype=dtype, device=device)
        self.l = torch.zeros((*lead_shape, 1), dtype=dtype, device=device)
        self.acc = torch.zeros((*lead_shape, D), dtype=dtype, device=device)

    def absorb(self, s: torch.Tensor, v) -> None:
        """v: values (..., R, D), or a callable p -> p @ values (for layouts matmul can't batch)."""
        if s.shape[-1] == 0:
            return
        m_new = torch.maximum(self.m, s.amax(dim=-1, keepdim=True))
        m_use = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # all -inf so far
        alpha = torch.exp(self.m - m_use)
        p = torch.exp(s - m_use)
        self.l = self.l * alpha + p.sum(-1, keepdim=True)
        self.acc = self.acc * alpha + (v(p) if callable(v) else torch.matmul(p, v))
        self.m = m_new

    def result(self):
        """(out (..., D), lse (...)); nothing absorbed / all masked -> out 0, lse -inf."""
        has = self.l > 0
        out = self.acc / torch.where(has, self.l, torch.ones_like(self.l))
        m_use = torch.where(torch.isinf(self.m), torch.zeros_like(self.m), self.m)
        lse = torch.where(has, m_use + torch.log(torch.where(has, self.l, torch.ones_like(self.l))),
                          torch.full_like(self.l, float("-inf")))
        return out, lse.squeeze(-1)
