"""Llama-family decoder forward (Llama, Mistral, Qwen2) over a flattened batch, in plain torch.

One call runs the new tokens of every scheduled sequence at once — prefill chunks and decode tokens
concatenated along one token axis T — and returns logits only for the rows that get sampled
(`logits_indices`, the last new token of each sampled sequence): the LM head is the largest matmul
(vocab 49152 x hidden), so skipping it for the other prefill rows is a large prefill win.

Weights are fused at load time: q/k/v -> one (Hq+2Hkv)*D x H matrix, gate/up -> one 2I x H matrix,
so a layer runs 4 matmuls instead of 7 (fewer kernel launches and Python calls per layer; with 30
layers the per-op overhead is a visible share of a decode step).

Each layer's FFN is a slot (runtime/ffn.py): the dense MLP, a memory layer ("replace") or both
("parallel"), per config.json `memory_layers`, so one class serves dense and memory-layer models.
Value tables are kept in their stored dtype (memory-mapped by the loader) and reached only through
`ValueStore`s: `value_stores()` lists them by tensor name, `replace_value_store` swaps one (deploy/
puts remote shards there after load).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import AttentionBackend, AttentionMetadata
from .config import ModelConfig
from .ffn import FFN, LookupStats, build_memory_layers, memory_param_bytes
from .memory_layers import ValueStore
from .quant import Linear, make_linear


class DecoderLayer:
    __slots__ = ("input_norm", "post_norm", "qkv", "o", "ffn")

    def __init__(self, input_norm, post_norm, qkv, o, ffn: FFN):
        self.input_norm, self.post_norm = input_norm, post_norm
        self.qkv, self.o, self.ffn = qkv, o, ffn

    @property
    def gate_up(self):
        return self.ffn.gate_up

    @property
    def down(self):
        return self.ffn.down


class Model:
    """Built from HF-named fp32 weights. `quantization="int8"` makes every linear (incl. the LM
    head) int8 (runtime/quant.py), "int4" int4 with an optional int8/fp32 copy for many-row calls
    (runtime/quant_int4.py; `int4`: its Int4Options, `q4_blocks`: GGUF Q4 blocks by HF name, whose
    codes it keeps); embeddings and norms stay fp32."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], quantization: str | None = None,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", consume: bool = False,
                 int4=None, q4_blocks: dict | None = None):
        """`consume=True` pops tensors out of `weights` as they are fused/quantized, so the loader's
        copy is freed layer by layer (peak RSS ~ one copy of the weights instead of two)."""
        self.config = c = config
        self.dtype, self.device = dtype, device
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_size = c.num_attention_heads * c.head_dim
        self.kv_size = c.num_key_value_heads * c.head_dim
        self.eps = c.rms_norm_eps

        def w(name, keep_dtype=False):
            t = weights.pop(name) if consume and name != "model.embed_tokens.weight" else weights[name]
            return t.to(device=device) if keep_dtype else t.to(device=device, dtype=dtype)

        def lin(weight, bias, *names):
            blocks = None
            if quantization == "int4" and q4_blocks and all(n in q4_blocks for n in names):
                blocks = [q4_blocks[n] for n in names]
            return make_linear(weight, bias, quantization, int4=int4, blocks=blocks)

        mc = c.memory_layers
        self.lookup_stats = LookupStats()
        self.memory_layers, self._stores = ({}, {}) if mc is None else build_memory_layers(
            mc, c.hidden_size, w, lambda n: n in weights)
        replace = mc is not None and mc.mode == "replace"
        self.embed = w("model.embed_tokens.weight")  # (V, H)
        self.layers: list[DecoderLayer] = []
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            qkv_w = torch.cat([w(p + f"self_attn.{n}_proj.weight") for n in "qkv"])  # ((Hq+2Hkv)*D, H)
            qkv_b = None
            if c.attention_bias:
                qkv_b = torch.cat([w(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            mem = self.memory_layers.get(i)
            gate_up = down = None
            if mem is None or not replace:
                gate_up_w = torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")])  # (2I, H)
                gate_up = lin(gate_up_w, None, p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
                down = lin(w(p + "mlp.down_proj.weight"), None, p + "mlp.down_proj.weight")
            self.layers.append(DecoderLayer(
                input_norm=w(p + "input_layernorm.weight"),
                post_norm=w(p + "post_attention_layernorm.weight"),
                qkv=lin(qkv_w, qkv_b, *(p + f"self_attn.{n}_proj.weight" for n in "qkv")),
                o=lin(w(p + "self_attn.o_proj.weight"), None, p + "self_attn.o_proj.weight"),
                ffn=FFN(gate_up, down, c.intermediate_size, mem, self.lookup_stats),
            ))
        self.final_norm = w("model.norm.weight")
        head = self.embed if c.tie_word_embeddings else w("lm_head.weight")
        head_name = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        self.lm_head = lin(head, None, head_name) if quantization else Linear(head)
        self.intermediate_size = c.intermediate_size

    @property
    def nbytes(self) -> int:
        n = self.embed.numel() * self.embed.element_size()
        for L in self.layers:
            n += sum(lin.nbytes for lin in (L.qkv, L.o, L.gate_up, L.down) if lin is not None)
            n += 2 * L.input_norm.numel() * L.input_norm.element_size()
            if L.ffn.memory is not None:
                n += memory_param_bytes(L.ffn.memory)
        if not (self.config.tie_word_embeddings and isinstance(self.lm_head, Linear)):
            n += self.lm_head.nbytes
        return n  # value tables not included: see memory_table_bytes

    # ---- memory layers ------------------------------------------------------------------------
    def value_stores(self) -> dict[str, ValueStore]:
        """Value stores by table tensor name ("model.memory_values.weight" or
        "model.layers.{i}.memory.values.weight"); empty for a dense model."""
        return dict(self._stores)

    def replace_value_store(self, name: str, store: ValueStore) -> None:
        """Serve table `name` from `store` (e.g. remote shards) in every memory layer that reads it."""
        if name not in self._stores:
            raise KeyError(f"no value table {name!r}; this model has {sorted(self._stores) or 'none'}")
        old = self._stores[name]
        if (store.num_rows, store.dim) != (old.num_rows, old.dim):
            raise ValueError(f"store for {name} is ({store.num_rows}, {store.dim}); the table is "
                             f"({old.num_rows}, {old.dim})")
        self._stores[name] = store
        for m in self.memory_layers.values():
            if m.values is old:
                m.values = store

    @property
    def memory_table_bytes(self) -> int:
        return sum(s.nbytes for s in self._stores.values())

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, attn: AttentionBackend,
                logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (T,) int64 -> logits (len(logits_indices), V) fp32 (all T rows if None)."""
        T = input_ids.shape[0]
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qs, kvs = self.q_size, self.kv_size
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
            h = h + L.ffn(x)
        if logits_indices is not None:
            h = h.index_select(0, logits_indices)  # (N, H)
        h = self._norm(h, self.final_norm)
        return self.lm_head(h).float()
