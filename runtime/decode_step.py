"""The single-stream decode step: one new token of one sequence through every layer, as few ops as
possible, optionally `torch.compile`d (EngineArgs.compile).

`Model.forward` handles any flattened batch through the attention backend's interface; a lone decode
token of a dense model over the plain paged cache (the case a chat user waits on) takes this path
instead: same math, written as one function over the flat KV storage so that

* attention is two bmm over the KV heads with the G = Hq/Hkv query heads of a group as rows, against
  the sequence's filled context as a zero-copy slice of the cache (no SDPA with enable_gqa: ~420 µs
  per call at one query on this project's boxes, vs ~16 µs folded);
* RoPE rotates q and k in one call (they are adjacent in the fused qkv output); SiLU·mul is one
  `silu_` in place plus one `mul`; RMSNorm is `F.rms_norm`;
* under `torch.compile` (inductor) the elementwise chains (norm + residual + bf16 cast for the int4
  op, RoPE + cache write, SiLU·mul) fuse into a handful of C++ loops and the Python per-op overhead of
  30 layers goes. Measured figures are in the README's Throughput section.

`native` (the default, EngineArgs.decode_path="native") runs the same step as one C++ call instead
(kernels/cpu_decode.py: the same torch kernels for matmuls, attention reductions, softmax, SiLU, RMSNorm's
mean; plain loops for the elementwise rest; bit-identical logits to `decode_one` here), where the model
is on the CPU with int4 or fp32 linears and the extension builds; else this eager function.

Memory layers (issue 16) run their FFN slot (`L.ffn`: lookup, value store, stats) as Model.forward does, from
here or from the C++ step's FFN hook. Where the sequence's blocks are not consecutive or the backend is not
the dense paged one (KV memory), the engine keeps `Model.forward`.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .attention import RotaryEmbedding


def decode_one(model, input_ids: torch.Tensor, pos: torch.Tensor, cos_t: torch.Tensor, sin_t: torch.Tensor,
               kv: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (1, V) fp32, new k/v (2, L, Hkv, D)) of one decode token.

    input_ids, pos (1,) int64: the token and its position; cos_t/sin_t (P, 1, D) RotaryEmbedding.cos_sin
    of positions 0..P-1; kv the flat cache (2, L, slots, Hkv, D), read only: the sequence's cached context
    is slots [start, end). The token's own k/v are attended to from registers and returned, and the caller
    writes them (one copy for all layers): a cache write inside a compiled graph made inductor copy the
    whole cache every step (65 ms per step on a 16 MB cache)."""
    Hq, Hkv, D = model.num_heads, model.num_kv_heads, model.head_dim
    G, qs, kvs, eps = Hq // Hkv, model.q_size, model.kv_size, model.eps
    scale = D ** -0.5
    cos, sin = cos_t[pos], sin_t[pos]  # (1, 1, D)
    h = F.embedding(input_ids, model.embed)  # (1, H)
    new_k, new_v = [], []
    for i, L in enumerate(model.layers):
        x = F.rms_norm(h, (h.shape[-1],), L.input_norm, eps)
        qkv = L.qkv(x)  # (1, (Hq+2Hkv)*D)
        qk = RotaryEmbedding.apply(qkv[:, :qs + kvs].view(1, Hq + Hkv, D), cos, sin)  # q and k in one call
        q, k, v = qk[0, :Hq].view(Hkv, G, D), qk[0, Hq:], qkv[0, qs + kvs:].view(Hkv, D)
        kc, vc = kv[0, i, start:end], kv[1, i, start:end]  # (S, Hkv, D), zero-copy
        s = torch.cat((torch.bmm(q, kc.permute(1, 2, 0)), torch.bmm(q, k.unsqueeze(-1))), -1)  # (Hkv, G, S+1)
        p = torch.softmax(s * scale, dim=-1)
        o = torch.baddbmm(p[..., -1:] * v.unsqueeze(1), p[..., :-1], vc.transpose(0, 1))  # (Hkv, G, D)
        new_k.append(k)
        new_v.append(v)
        h = h + L.o(o.view(1, qs))
        x = F.rms_norm(h, (h.shape[-1],), L.post_norm, eps)
        if L.ffn.memory is not None:  # memory layer (issue 16): its FFN slot as Model.forward runs it
            h = h + L.ffn(x)
            continue
        gu = L.gate_up(x)  # (1, 2I)
        inter = gu.shape[1] // 2
        h = h + L.down(F.silu(gu[:, :inter]) * gu[:, inter:])
    h = F.rms_norm(h, (h.shape[-1],), model.final_norm, eps)
    return model.lm_head(h).float(), torch.stack((torch.stack(new_k), torch.stack(new_v)))


class DecodeStep:
    """`decode_one`, eager, compiled or native (C++; `path` says which runs). Compilation happens on the first call (its time is kept in
    `compile_seconds`); the context length is a dynamic dimension, so one graph serves every length."""

    def __init__(self, model, rope, kv_storage: torch.Tensor, compile: bool = False, native: bool = False):
        self.model, self.kv, self.rope = model, kv_storage, rope
        n2, nl, nb, bs, hkv, d = kv_storage.shape
        self.flat = kv_storage.view(n2, nl, nb * bs, hkv, d)
        # RoPE tables of positions 0..P-1, grown by doubling as sequences get longer (not sized by the pool:
        # a tiny model's 1 GiB pool holds millions of positions)
        self.cos_t = self.sin_t = torch.empty(0)
        self.compiled = compile
        self.compile_seconds: float | None = None
        self._fn = decode_one
        # native: the whole step as one C++ call (kernels/cpu_decode.py), where it applies and builds
        self.native = self.batched = None
        if native and not compile:
            from memserve.kernels.cpu_decode import native_decode_model
            from memserve.kernels.cpu_decode_batched import native_batched_model

            self.native = native_decode_model(model)
            # B > 1 decode tokens (kernels/cpu_decode_batched.py); also int8 models
            self.batched = native_batched_model(model)
        if compile and model.memory_layers:  # a memory FFN (stats, value stores) is no fullgraph: eager
            compile = self.compiled = False
        if compile:
            # the C++ wrapper calls the generated kernels without a Python frame per op. Measured 2026-12-07
            # (EPYC, 2 cores, 1 thread, box loaded, int4, same run): eager 20.2 ms/token, compiled with the
            # C++ wrapper 17.7 (compile 666 s), without it 46 vs eager 38 (compile 518 s)
            self._fn = torch.compile(decode_one, dynamic=True, fullgraph=True, options={"cpp_wrapper": True})

    @property
    def path(self) -> str:
        return "native" if self.native is not None else "compile" if self.compiled else "eager"

    def _rope_tables(self, pos: int) -> None:
        if pos >= self.cos_t.shape[0]:
            n = max(4096, 2 * self.cos_t.shape[0], pos + 1)
            self.cos_t, self.sin_t = self.rope.cos_sin(torch.arange(n, device=self.kv.device))

    @torch.inference_mode()
    def batch(self, tokens: list[int], positions: list[int], slots: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Logits (B, V) of one decode token per sequence (the batched C++ step; `batched` must be set):
        tokens[b] at positions[b], its k/v written to flat slot slots[b], attending to positions
        0..positions[b] of its sequence through block table tables[b] (covering them)."""
        self._rope_tables(max(positions))
        bs = self.kv.shape[3]
        nb = [p // bs + 1 for p in positions]
        m = max(nb)
        bt = torch.tensor([t[:n] + [0] * (m - n) for t, n in zip(tables, nb)], dtype=torch.int32)
        return self.batched.step(torch.tensor(tokens), torch.tensor(positions), torch.tensor(slots), bt,
                                 self.cos_t, self.sin_t, self.flat, bs)

    @torch.inference_mode()
    def __call__(self, token: int, pos: int, slot: int, start: int, end: int) -> torch.Tensor:
        """Logits (1, V) of `token` at position `pos`, its k/v written to flat cache slot `slot`, attending
        to its context at flat slots [start, end) and itself."""
        dev = self.kv.device
        self._rope_tables(pos)
        if self.native is not None:
            return self.native.step(token, pos, self.cos_t, self.sin_t, self.flat, start, end, slot)
        args = (self.model, torch.tensor([token], device=dev), torch.tensor([pos], device=dev), self.cos_t,
                self.sin_t, self.flat, start, end)
        t0 = time.perf_counter()
        logits, new_kv = self._fn(*args)
        if self.compiled and self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - t0
        self.flat[:, :, slot] = new_kv
        return logits
