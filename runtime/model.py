"""Llama-family decoder forward (Llama, Mistral, Qwen2) over a flattened batch, in plain torch.

One call runs the new tokens of every scheduled sequence at once — prefill chunks and decode tokens
concatenated along one token axis T — and returns logits only for the rows that get sampled
(`logits_indices`, the last new token of each sampled sequence): the LM head is the largest matmul
(vocab 49152 x hidden), so skipping it for the other prefill rows is a large prefill win.

Weights are fused at load time: q/k/v -> one (Hq+2Hkv)*D x H matrix, gate/up -> one 2I x H matrix,
so a layer runs 4 matmuls instead of 7 (fewer kernel launches and Python calls per layer; with 30
layers the per-op overhead is a visible share of a decode step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import AttentionBackend, AttentionMetadata
from .config import ModelConfig
from .quant import Linear, make_linear


class DecoderLayer:
    __slots__ = ("input_norm", "post_norm", "qkv", "o", "gate_up", "down")

    def __init__(self, input_norm, post_norm, qkv, o, gate_up, down):
        self.input_norm, self.post_norm = input_norm, post_norm
        self.qkv, self.o, self.gate_up, self.down = qkv, o, gate_up, down


class Model:
    """Built from HF-named fp32 weights. `quantization="int8"` makes every linear (incl. the LM
    head) int8 (runtime/quant.py); embeddings and norms stay fp32."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], quantization: str | None = None,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", consume: bool = False):
        """`consume=True` pops tensors out of `weights` as they are fused/quantized, so the loader's
        copy is freed layer by layer (peak RSS ~ one copy of the weights instead of two)."""
        self.config = c = config
        self.dtype, self.device = dtype, device
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_size = c.num_attention_heads * c.head_dim
        self.kv_size = c.num_key_value_heads * c.head_dim
        self.eps = c.rms_norm_eps

        def w(name):
            t = weights.pop(name) if consume and name != "model.embed_tokens.weight" else weights[name]
            return t.to(device=device, dtype=dtype)

        self.embed = w("model.embed_tokens.weight")  # (V, H)
        self.layers: list[DecoderLayer] = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            qkv_w = torch.cat([w(p + f"self_attn.{n}_proj.weight") for n in "qkv"])  # ((Hq+2Hkv)*D, H)
            qkv_b = None
            if c.attention_bias:
                qkv_b = torch.cat([w(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            gate_up_w = torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")])  # (2I, H)
            self.layers.append(DecoderLayer(
                input_norm=w(p + "input_layernorm.weight"),
                post_norm=w(p + "post_attention_layernorm.weight"),
                qkv=make_linear(qkv_w, qkv_b, quantization),
                o=make_linear(w(p + "self_attn.o_proj.weight"), None, quantization),
                gate_up=make_linear(gate_up_w, None, quantization),
                down=make_linear(w(p + "mlp.down_proj.weight"), None, quantization),
            ))
        self.final_norm = w("model.norm.weight")
        head = self.embed if c.tie_word_embeddings else w("lm_head.weight")
        self.lm_head = make_linear(head, None, quantization) if quantization else Linear(head)
        self.intermediate_size = c.intermediate_size

    @property
    def nbytes(self) -> int:
        n = self.embed.numel() * self.embed.element_size()
        for L in self.layers:
            n += sum(lin.nbytes for lin in (L.qkv, L.o, L.gate_up, L.down))
            n += 2 * L.input_norm.numel() * L.input_norm.element_size()
        if not (self.config.tie_word_embeddings and isinstance(self.lm_head, Linear)):
            n += self.lm_head.nbytes
        return n

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, attn: AttentionBackend,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (T,) int64 -> logits (len(logits_indices), V) fp32 (all T rows if None)."""
        T = input_ids.shape[0]
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qs, kvs, inter = self.q_size, self.kv_size, self.intermediate_size
        attn.prepare(meta)
        h = F.embedding(input_ids, self.embed)  # (T, H)
        for i, L in enumerate(self.layers):
            x = self._norm(h, L.input_norm)
            qkv = L.qkv(x)  # (T, (Hq+2Hkv)*D)
            q = qkv[:, :qs].view(T, Hq, D)
            k = qkv[:, qs:qs + kvs].view(T, Hkv, D)
            v = qkv[:, qs + kvs:].view(T, Hkv, D)
            o = attn.forward(i, q, k, v, meta)  # (T, Hq, D)
            h = h + L.o(o.reshape(T, qs))
            x = self._norm(h, L.post_norm)
            gu = L.gate_up(x)  # (T, 2I)
            h = h + L.down(F.silu(gu[:, :inter]) * gu[:, inter:])
        if logits_indices is not None:
            h = h.index_select(0, logits_indices)  # (N, H)
        h = self._norm(h, self.final_norm)
        return self.lm_head(h).float()
