"""A differentiable forward of a frozen Llama-family stack, for `memorize` (issue 16 item 3).

The serving `Model` (runtime/model.py) runs under inference_mode over a flattened ragged batch with a
paged KV cache; training needs autograd, so this is a plain (B, T) right-padded forward over the
checkpoint's HF-named fp32 weights. Every weight is frozen (no grad); only the value tables that the
caller passes as leaf tensors get gradients. Right padding is safe under the causal mask: a real
token never attends to a later (padded) position.

Split points (why memorize is cheap): `below(ids, L)` runs layers [0, L) and layer L's attention and
dense MLP, returning what a memory read at L needs (`x`, the FFN input) and the residual without the
memory (`r`). The base below L is frozen and the first memory layer's lookup depends only on x, so
both are computed once, cached, and every training step runs only `above(h, L + 1)`. `prefix_kv` also
returns the keys/values of every layer above L, so a step can run above L on a sequence's last tokens
only (`above(..., pos=, past=)`), attending to the cached keys/values of the tokens before them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.pkm import pkm_topk_torch
from .attention import rope_inv_freq
from .ffn import values_name


class FrozenStack:
    def __init__(self, config, weights: dict[str, torch.Tensor]):
        self.c = c = config
        self.w = weights
        self.mc = c.memory_layers
        self.inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        self.head = weights["model.embed_tokens.weight"] if c.tie_word_embeddings else weights["lm_head.weight"]

    # ---- pieces ---------------------------------------------------------------------------------------
    def _norm(self, x, name):
        return F.rms_norm(x, (x.shape[-1],), self.w[name], self.c.rms_norm_eps)

    def _rope(self, pos: torch.Tensor):
        """cos, sin for positions pos ((T,) or (B, T)) -> (..., T, 1, D), broadcast over heads."""
        ang = pos.float()[..., None] * self.inv_freq  # (..., T, D/2)
        cos, sin = ang.cos(), ang.sin()
        return torch.cat((cos, cos), -1).unsqueeze(-2), torch.cat((-sin, sin), -1).unsqueeze(-2)

    @staticmethod
    def _rot(x, cos, sin):  # x (B, T, H, D); rotate-half RoPE in the HF layout
        B, T, H, D = x.shape
        return x * cos + x.reshape(B, T, H, 2, D // 2).flip(3).reshape(B, T, H, D) * sin

    def _lin(self, x, name, bias=False):
        b = self.w.get(name.removesuffix("weight") + "bias") if bias else None
        return F.linear(x, self.w[name], b)

    def attention(self, i: int, h: torch.Tensor, pos=None, past=None, kv_out: list | None = None) -> torch.Tensor:
        """Causal self-attention of layer i (+ residual). pos: (B, T) positions (default 0..T-1); past =
        (k, v, mask): cached post-RoPE keys/values (B, P, Hkv, D) in front of h's tokens and a boolean
        attention mask (B, 1, T, P + T); kv_out collects this layer's post-RoPE (k, v)."""
        c, p = self.c, f"model.layers.{i}."
        B, T, _ = h.shape
        x = self._norm(h, p + "input_layernorm.weight")
        q = self._lin(x, p + "self_attn.q_proj.weight", c.attention_bias).view(B, T, c.num_attention_heads, -1)
        k = self._lin(x, p + "self_attn.k_proj.weight", c.attention_bias).view(B, T, c.num_key_value_heads, -1)
        v = self._lin(x, p + "self_attn.v_proj.weight", c.attention_bias).view(B, T, c.num_key_value_heads, -1)
        cos, sin = self._rope(torch.arange(T) if pos is None else pos)
        q, k = self._rot(q, cos, sin), self._rot(k, cos, sin)
        if kv_out is not None:
            kv_out.append((k, v))
        if past is None:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=True)  # (B, Hq, T, D)
        else:
            pk, pv, mask = past
            o = F.scaled_dot_product_attention(q.transpose(1, 2), torch.cat((pk, k), 1).transpose(1, 2),
                                               torch.cat((pv, v), 1).transpose(1, 2), attn_mask=mask,
                                               enable_gqa=True)
        return h + self._lin(o.transpose(1, 2).reshape(B, T, -1), p + "self_attn.o_proj.weight")

    def mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{i}.mlp."
        return self._lin(F.silu(self._lin(x, p + "gate_proj.weight")) * self._lin(x, p + "up_proj.weight"),
                         p + "down_proj.weight")

    def lookup(self, i: int, x: torch.Tensor):
        """Memory read plan of layer i for FFN input x (..., hidden): (idx, weights, gate) with idx/weights
        (..., heads*knn) and gate = silu(swilu_proj(x)) (..., v_dim) or None. A memory gate
        (`memory.gate.weight`) is folded into the weights."""
        mc, p = self.mc, f"model.layers.{i}.memory."
        lead = x.shape[:-1]
        xf = x.reshape(-1, x.shape[-1])
        q = F.linear(xf, self.w[p + "query_proj.weight"], self.w.get(p + "query_proj.bias"))
        idx, wt = pkm_topk_torch(q.view(xf.shape[0], mc.heads, mc.k_dim), self.w[p + "keys"], mc.knn)
        gate = F.silu(F.linear(xf, self.w[p + "swilu_proj.weight"], self.w.get(p + "swilu_proj.bias"))) if mc.swilu else None
        if p + "gate.weight" in self.w:  # out *= sigmoid(gate(x)): folded into the slot weights (exact
            if p + "value_proj.bias" in self.w:  # while value_proj has no bias)
                raise NotImplementedError("FrozenStack: a memory gate with a value_proj bias")
            wt = wt * torch.sigmoid(F.linear(xf, self.w[p + "gate.weight"], self.w.get(p + "gate.bias")))
        K = idx.shape[-1]
        return idx.view(*lead, K), wt.view(*lead, K), None if gate is None else gate.view(*lead, -1)

    def memory_out(self, i: int, idx, wt, gate, tables: dict[str, torch.Tensor]) -> torch.Tensor:
        """value_proj(bag * gate) with bag read from `tables[values_name]` (a leaf with sparse grads)."""
        table = tables[values_name(self.mc, i)]
        lead = idx.shape[:-1]
        bag = F.embedding_bag(idx.reshape(-1, idx.shape[-1]), table, mode="sum", sparse=True,
                              per_sample_weights=wt.reshape(-1, wt.shape[-1])).view(*lead, -1)
        if gate is not None:
            bag = bag * gate
        vp = self.w.get(f"model.layers.{i}.memory.value_proj.weight")
        return bag if vp is None else F.linear(bag, vp, self.w.get(f"model.layers.{i}.memory.value_proj.bias"))

    # ---- the two halves --------------------------------------------------------------------------------
    def below(self, ids: torch.Tensor, L: int, tables) -> tuple[torch.Tensor, torch.Tensor]:
        """Layers [0, L) in full, then layer L without its memory: (x = FFN input at L, r = residual)."""
        h = F.embedding(ids, self.w["model.embed_tokens.weight"])
        for i in range(L):
            h = self.layer(i, h, tables)
        h = self.attention(L, h)
        x = self._norm(h, f"model.layers.{L}.post_attention_layernorm.weight")
        return x, h + self.mlp(L, x) if self._has_mlp(L) else h

    def prefix_kv(self, ids: torch.Tensor, L: int, tables):
        """The full forward (memory read with `tables` as they are): x and r at L (see `below`) and, per
        layer above L, its post-RoPE (k, v) (B, T, Hkv, D)."""
        x, r = self.below(ids, L, tables)
        h = r + self.memory_out(L, *self.lookup(L, x), tables)
        kvs: list = []
        for i in range(L + 1, self.c.num_hidden_layers):
            h = self.layer(i, h, tables, kv_out=kvs)
        return x, r, kvs

    def _has_mlp(self, i: int) -> bool:
        return f"model.layers.{i}.mlp.down_proj.weight" in self.w

    def layer(self, i: int, h: torch.Tensor, tables, hits: list | None = None, pos=None, past=None,
              kv_out: list | None = None) -> torch.Tensor:
        """Decoder layer i; hits collects (table name, indices, weights) of its memory read (if any)."""
        h = self.attention(i, h, pos, past, kv_out)
        x = self._norm(h, f"model.layers.{i}.post_attention_layernorm.weight")
        y = self.mlp(i, x) if self._has_mlp(i) else 0
        if self.mc is not None and i in self.mc.layers:
            idx, wt, gate = self.lookup(i, x)
            if hits is not None:
                hits.append((values_name(self.mc, i), idx, wt))
            y = y + self.memory_out(i, idx, wt, gate, tables)
        return h + y

    def above(self, h: torch.Tensor, start: int, tables, hits: list | None = None, pos=None,
              past: list | None = None) -> torch.Tensor:
        """Layers [start, n) then the final norm: hidden states (B, T, hidden) for the LM head. past: per
        layer from `start`, (k, v, mask) cached in front of h's tokens (see `attention`)."""
        for n, i in enumerate(range(start, self.c.num_hidden_layers)):
            h = self.layer(i, h, tables, hits, pos, None if past is None else past[n])
        return self._norm(h, "model.norm.weight")

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.head)
