"""init-memory (issue 16 item 2): a "parallel" memory-layer model from any base checkpoint.

The base is loaded with the normal loader (a GGUF base, e.g. "default", is dequantized to fp32: the
written model holds those fp weights, not the GGUF's quantized blocks). Memory params are random
except value_proj, which is ZERO: the memory output is exactly 0, MLP + 0 = MLP bit for bit, so the
new model's logits and greedy output equal the base's until `memorize` trains it.
`values_dtype` stores the value table(s) as float32 / bfloat16 / float16, or int8 rows + per-row
fp32 scales (`…values.scales`, see runtime/ffn.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..kernels import quantize_rows_int8
from .ffn import scales_name, values_name
from .loader import load_checkpoint
from .memory_layers import MemoryLayersConfig

VALUES_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
_ARCH_TYPE = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def hf_config_dict(c) -> dict:
    """config.json for a ModelConfig (what ModelConfig.from_hf_dict reads back to the same config)."""
    d = {"architectures": [c.architecture], "model_type": _ARCH_TYPE[c.architecture],
         "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
         "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
         "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
         "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings,
         "tie_word_embeddings": c.tie_word_embeddings, "hidden_act": "silu", "bos_token_id": c.bos_token_id,
         "eos_token_id": list(c.eos_token_ids)}
    if c.rope_scaling:
        d["rope_scaling"] = dict(c.rope_scaling)
    return d


def write_safetensors_model(outp: Path, files: dict[str, dict[str, torch.Tensor]]) -> None:
    """Tensors by file name (the value tables in a file of their own, so they map alone) + the index."""
    from safetensors.torch import save_file

    weight_map = {}
    for fname, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(outp / fname), metadata={"format": "pt"})
        weight_map |= {k: fname for k in tensors}
    (outp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_memory_model(out, state: dict, tables: dict, c, mem: dict, tokenizer) -> Path:
    """A memory-layer model directory in the public format: the dense/memory tensors and the value tables
    in their own safetensors files (so a table maps alone), config.json with `memory_layers`, tokenizer."""
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    write_safetensors_model(outp, {"model-00001-of-00002.safetensors": state,
                                   "model-00002-of-00002.safetensors": tables})
    cfg = hf_config_dict(c)
    cfg["memory_layers"] = mem
    (outp / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer is not None:
        tokenizer.save_hf(outp)
    return outp


def init_memory(base: str, out: str, layers: list[int], n_keys: int = 256, heads: int = 4, knn: int = 32,
                k_dim: int = 256, v_dim: int | None = None, shared_values: bool = True, swilu: bool = True,
                seed: int = 0, progress: bool = True, values_dtype: str = "float32") -> Path:
    if values_dtype not in VALUES_DTYPES:
        raise ValueError(f"values dtype {values_dtype!r}: expected one of {sorted(VALUES_DTYPES)}")

    ck = load_checkpoint(base, progress=progress)
    c = ck.config
    if c.memory_layers is not None:
        raise ValueError(f"{base} already has memory_layers; init-memory needs a dense base")
    hidden = c.hidden_size
    mem = {"layers": sorted(layers), "mode": "parallel", "n_keys": n_keys, "heads": heads, "knn": knn,
           "k_dim": k_dim, "v_dim": v_dim or hidden, "shared_values": shared_values, "swilu": swilu}
    mc = MemoryLayersConfig.from_dict(mem, hidden, c.num_hidden_layers)  # validates (names what to change)
    g = torch.Generator().manual_seed(seed)
    state = dict(ck.weights)
    tables = {}
    for i in mc.layers:
        p = f"model.layers.{i}.memory."
        state[p + "query_proj.weight"] = torch.randn(heads * k_dim, hidden, generator=g) / hidden ** 0.5
        state[p + "keys"] = torch.randn(heads, 2, n_keys, k_dim // 2, generator=g) / (k_dim // 2) ** 0.5
        state[p + "value_proj.weight"] = torch.zeros(hidden, mc.v_dim)  # zero: output equals the base's
        if swilu:
            state[p + "swilu_proj.weight"] = torch.randn(mc.v_dim, hidden, generator=g) / hidden ** 0.5
        vn = values_name(mc, i)
        if vn not in tables:
            t = torch.randn(mc.num_slots, mc.v_dim, generator=g) / mc.v_dim ** 0.5
            if values_dtype == "int8":
                tables[vn], tables[scales_name(vn)] = quantize_rows_int8(t)
            else:
                tables[vn] = t.to(VALUES_DTYPES[values_dtype])
    return write_memory_model(out, state, tables, c, mem, ck.tokenizer)
