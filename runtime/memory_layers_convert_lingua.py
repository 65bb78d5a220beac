"""convert-memory --from lingua (issue 16 item 4): a checkpoint of Meta's lingua memory code
(facebookresearch/memory: `params.json` + `consolidated.pth`, the latter loaded with
torch.load(weights_only=True) as their own loader does) -> the issue-16 format, as a whole model.

Names and shapes, read from their source (lingua/transformer.py, lingua/product_key/memory.py):
    tok_embeddings.weight (V, dim), norm.weight, output.weight (V, dim)
    layers.{i}.attention.{wq,wk,wv,wo}.weight, layers.{i}.attention_norm.weight, .ffn_norm.weight
    dense layer:   layers.{i}.feed_forward.{w1,w3,w2}.weight       (gate, up, down; SwiGLU)
    memory layer (i in params.model.productkey_args.layers, the layer's whole FFN -> mode "replace"):
      layers.{i}.feed_forward.keys                        (2 * heads * n_keys, k_dim/2) = (heads, 2, n_keys, k_dim/2)
      layers.{i}.feed_forward.values.weight               (n_keys**2, v_dim)  (shared: one table, may be
                                                           stored under every memory layer)
      layers.{i}.feed_forward.query_proj.query_mlps.0.{weight,bias}   (heads*k_dim, dim) [+ BatchNorm1d at .1]
      layers.{i}.feed_forward.value_proj.{weight,bias}    (dim, v_dim)   when swilu or mem_v_dim > 0
      layers.{i}.feed_forward.swilu_projection.{weight,bias}  (v_dim, dim)  when swilu
      layers.{i}.feed_forward.gating.{weight,bias}        (1, dim)  when mem_gated: output *= sigmoid(gating(x))
Their math matches the format's: the query viewed (tokens*heads, k_dim), halves q[:k_dim/2], q[k_dim/2:],
top-knn per half, top-knn of the knn x knn sums, index i1*n_keys + i2, fp32 softmax per head, sum bag,
value_proj(bag * silu(swilu_projection(x))) - both projections are nn.Linear with a bias, which the
format carries as optional `.bias` tensors. Their RoPE rotates interleaved pairs (2j, 2j+1); the HF
layout pairs (j, j + head_dim/2), so wq/wk rows are permuted per head (scores are unchanged).
Not convertible (named in the error): the PEER variant, weight tying.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .config import ModelConfig
from .memory_layers import MemoryLayersConfig
from .memory_layers_convert import fold_batchnorm
from .memory_layers_init import write_memory_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def _layers(spec) -> list[int]:
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, (list, tuple)):
        return [int(s) for s in spec]
    return [int(s) for s in str(spec).split(",") if s.strip()]


def _rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection from interleaved-pair RoPE order to the HF rotate-half order, per head."""
    hd = w.shape[0] // heads
    perm = torch.cat((torch.arange(0, hd, 2), torch.arange(1, hd, 2)))
    return w.view(heads, hd, -1)[:, perm].reshape(w.shape)


def _ffn_dim(m: dict) -> int:
    """lingua's FeedForward width: int(2 * 4 * dim / 3), times ffn_dim_multiplier, rounded up to multiple_of."""
    h = int(2 * 4 * m["dim"] / 3)
    if m.get("ffn_dim_multiplier") is not None:
        h = int(m["ffn_dim_multiplier"] * h)
    mo = m.get("multiple_of", 256)
    return mo * ((h + mo - 1) // mo)


def load_lingua(src: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(params.json's dict, the model state dict) of a lingua consolidated checkpoint directory."""
    d = Path(src)
    if not (d / "params.json").is_file() or not (d / "consolidated.pth").is_file():
        raise ValueError(f"{src}: a lingua checkpoint directory needs params.json and consolidated.pth "
                         "(lingua's consolidate_checkpoints writes them under <ckpt>/consolidated/)")
    params = json.loads((d / "params.json").read_text())
    sd = torch.load(d / "consolidated.pth", map_location="cpu", weights_only=True, mmap=True)
    sd = sd.get("model", sd)
    return params, sd


def convert_lingua(src: str, out: str, tokenizer: str | None = None, bn_eps: float = 1e-5) -> Path:
    """Write the memory model of lingua checkpoint `src` to `out` (tokenizer files copied from `tokenizer`, an
    HF tokenizer directory, when given: lingua's own tokenizer is not part of the checkpoint)."""
    params, sd = load_lingua(src)
    m = params.get("model", params)
    pk = m.get("productkey_args") or {}
    for flag, what in (("peer_variant", "the PEER variant"), ("weight_tying", "weight tying")):
        if (pk if flag.startswith(("mem_", "peer")) else m).get(flag):
            raise ValueError(f"{src}: {what} cannot be converted (the issue-16 format has no equivalent)")
    if not pk.get("is_enabled") or not _layers(pk.get("layers", "")):
        raise ValueError(f"{src}: params.json model.productkey_args has no memory layers (is_enabled, layers); "
                         "this is a dense lingua model")

    def get(name: str, shape: tuple | None = None) -> torch.Tensor:
        if name not in sd:
            raise ValueError(f"{src}: consolidated.pth lacks {name}" + (f" (expected shape {shape})" if shape else ""))
        t = sd[name]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{src}: {name} has shape {tuple(t.shape)}; expected {tuple(shape)}")
        return t

    dim, L = int(m["dim"]), int(m["n_layers"])
    n_heads = int(m.get("n_heads") or dim // m["head_dim"])
    hd = int(m.get("head_dim") or dim // n_heads)
    n_kv = int(m.get("n_kv_heads") or n_heads)
    emb = get("tok_embeddings.weight")
    V = emb.shape[0]
    mem_layers = sorted(_layers(pk["layers"]))
    H, nk, knn, kd = int(pk.get("mem_heads", 4)), int(pk.get("mem_n_keys", 1024)), int(pk.get("mem_knn", 32)), \
        int(pk.get("mem_k_dim", 512))
    swilu, vd_arg = bool(pk.get("swilu_projection", True)), int(pk.get("mem_v_dim", -1))
    vd = vd_arg if vd_arg > 0 else dim
    has_vp = vd_arg > 0 or swilu
    shared = bool(pk.get("mem_share_values", True))
    inter = _ffn_dim(m)
    f32 = {"model.embed_tokens.weight": emb.float(), "model.norm.weight": get("norm.weight", (dim,)).float(),
           "lm_head.weight": get("output.weight", (V, dim)).float()}
    tables: dict[str, torch.Tensor] = {}
    for i in range(L):
        s, p = f"layers.{i}.", f"model.layers.{i}."
        f32[p + "self_attn.q_proj.weight"] = _rope_rows(get(s + "attention.wq.weight", (n_heads * hd, dim)).float(), n_heads)
        f32[p + "self_attn.k_proj.weight"] = _rope_rows(get(s + "attention.wk.weight", (n_kv * hd, dim)).float(), n_kv)
        f32[p + "self_attn.v_proj.weight"] = get(s + "attention.wv.weight", (n_kv * hd, dim)).float()
        f32[p + "self_attn.o_proj.weight"] = get(s + "attention.wo.weight", (dim, n_heads * hd)).float()
        f32[p + "input_layernorm.weight"] = get(s + "attention_norm.weight", (dim,)).float()
        f32[p + "post_attention_layernorm.weight"] = get(s + "ffn_norm.weight", (dim,)).float()
        f = s + "feed_forward."
        if i not in mem_layers:
            for ours, theirs, shape in (("gate_proj", "w1", (inter, dim)), ("up_proj", "w3", (inter, dim)),
                                        ("down_proj", "w2", (dim, inter))):
                f32[p + f"mlp.{ours}.weight"] = get(f + theirs + ".weight", shape).float()
            continue
        q = f + "query_proj.query_mlps."
        W = get(q + "0.weight", (H * kd, dim)).double()
        b = sd[q + "0.bias"].double() if q + "0.bias" in sd else torch.zeros(H * kd, dtype=torch.float64)
        if q + "1.running_mean" in sd:  # mem_query_batchnorm: eval-mode BatchNorm1d folded in
            W, b = fold_batchnorm(W, b, *(sd[q + "1." + n] for n in ("weight", "bias", "running_mean", "running_var")),
                                  eps=bn_eps)
        mp = p + "memory."
        f32[mp + "query_proj.weight"], f32[mp + "query_proj.bias"] = W.float(), b.float()
        f32[mp + "keys"] = get(f + "keys", (2 * H * nk, kd // 2)).float().reshape(H, 2, nk, kd // 2).clone()
        if has_vp:
            f32[mp + "value_proj.weight"] = get(f + "value_proj.weight", (dim, vd)).float()
            if f + "value_proj.bias" in sd:
                f32[mp + "value_proj.bias"] = get(f + "value_proj.bias", (dim,)).float()
        if pk.get("mem_gated"):  # output *= sigmoid(gating(x))
            f32[mp + "gate.weight"] = get(f + "gating.weight", (1, dim)).float()
            if f + "gating.bias" in sd:
                f32[mp + "gate.bias"] = get(f + "gating.bias", (1,)).float()
        if swilu:
            f32[mp + "swilu_proj.weight"] = get(f + "swilu_projection.weight", (vd, dim)).float()
            if f + "swilu_projection.bias" in sd:
                f32[mp + "swilu_proj.bias"] = get(f + "swilu_projection.bias", (vd,)).float()
        vname = "model.memory_values.weight" if shared else mp + "values.weight"
        if f + "values.weight" in sd:
            t = get(f + "values.weight", (nk * nk, vd))
            if vname in tables and not torch.equal(tables[vname], t):
                raise ValueError(f"{src}: mem_share_values but {f}values.weight differs from the first memory "
                                 "layer's table")
            tables.setdefault(vname, t if t.dtype in (torch.float32, torch.bfloat16, torch.float16) else t.float())
        elif not shared:
            get(f + "values.weight", (nk * nk, vd))  # raises: missing
    if shared and "model.memory_values.weight" not in tables:
        get(f"layers.{mem_layers[0]}.feed_forward.values.weight", (nk * nk, vd))  # raises: missing
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": dim,
          "intermediate_size": inter, "num_hidden_layers": L, "num_attention_heads": n_heads,
          "num_key_value_heads": n_kv, "head_dim": hd, "rms_norm_eps": float(m.get("norm_eps", 1e-5)),
          "rope_theta": float(m.get("rope_theta", 10000.0)), "max_position_embeddings": int(m.get("max_seqlen", 1024)),
          "tie_word_embeddings": False, "hidden_act": "silu"}
    mem = {"layers": mem_layers, "mode": "replace", "n_keys": nk, "heads": H, "knn": knn, "k_dim": kd, "v_dim": vd,
           "shared_values": shared, "swilu": swilu}
    MemoryLayersConfig.from_dict(mem, dim, L)  # validates (names what to change)
    outp = write_memory_model(out, f32, tables, ModelConfig.from_hf_dict(hf), mem, None)
    if tokenizer:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer) / name).is_file():
                shutil.copy2(Path(tokenizer) / name, outp / name)
    return outp
