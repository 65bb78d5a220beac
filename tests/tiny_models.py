"""Tiny random-weight Llama-family checkpoints for tests, built with HF transformers.

`make_tiny_model(dir, arch=...)` writes an HF directory (config.json + model.safetensors, optionally
tokenizer.json + tokenizer_config.json) that both transformers and memserve's loader read, so tests can
compare memserve against transformers on the very same weights.

Why the weights are not transformers' defaults: with its init (std 0.02, norms = 1, biases = 0) logits are
nearly flat (top-2 gaps ~1e-3) and a bug that ignores norm weights or q/k/v biases would go unnoticed. So
the linear/embedding std is 0.1 (attention softmax is far from uniform, greedy choices are decisive) and
norm weights / biases are randomised too.

The vocabulary is the real SmolLM2 one (49152 tokens) so text round-trips through the real tokenizer; the
tokenizer files are exported from the default model's GGUF by memserve's own tokenizer module.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Shared shape: GQA (4 query heads over 2 kv heads), head_dim 16.
BASE_CONFIG = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    bos_token_id=1,  # SmolLM2: <|im_start|>
    eos_token_id=2,  # SmolLM2: <|im_end|>
    pad_token_id=2,
)

ARCHS = ("llama", "mistral", "qwen2")

# Same rope_scaling shape as Llama 3.1 (factor 8, original window 8192), scaled down to the tiny window so
# that all three frequency bands (kept / interpolated / scaled) occur.
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}


def _config(arch: str, tied: bool, overrides: dict):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    kw = dict(BASE_CONFIG, tie_word_embeddings=tied)
    rope_theta = overrides.pop("rope_theta", 10000.0)
    rope_scaling = overrides.pop("rope_scaling", None)
    # transformers 5 keeps rope_theta and rope_scaling together in `rope_parameters`.
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling is not None:
        rope = dict(rope_scaling, rope_theta=rope_theta)
        rope.setdefault("rope_type", rope.pop("type", "default"))
    kw["rope_parameters"] = rope
    if arch == "llama":
        kw.update(num_hidden_layers=3)
        kw.update(overrides)
        return LlamaConfig(**kw)
    if arch == "mistral":
        kw.update(sliding_window=None)  # full attention (memserve serves no sliding-window models)
        kw.update(overrides)
        return MistralConfig(**kw)
    if arch == "qwen2":
        kw.update(num_hidden_layers=2, use_sliding_window=False, sliding_window=None)
        kw.update(overrides)
        return Qwen2Config(**kw)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def _randomise_(model, seed: int) -> None:
    """Norm weights around 1 and non-zero biases, so bugs that drop them change the logits."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def make_tiny_model(
    tmp_dir,
    arch: str = "llama",
    tied: bool = True,
    with_tokenizer: bool = True,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """Build a seeded tiny model of `arch` and save it as an HF directory at `tmp_dir`; return the path.

    `config_overrides` go to the transformers config (e.g. num_hidden_layers=4, rope_theta=5e5,
    rope_scaling=LLAMA3_ROPE_SCALING, max_position_embeddings=...).
    """
    from transformers import AutoModelForCausalLM

    out = Path(tmp_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _config(arch, tied, dict(config_overrides))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_(model, seed)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    # generation_config.json is transformers' own business; keep the directory minimal and predictable.
    (out / "generation_config.json").unlink(missing_ok=True)
    if with_tokenizer:
        write_default_tokenizer(out)
    return out


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_default_tokenizer(out_dir, _cache: dict = {}) -> None:  # noqa: B006 (per-process cache, on purpose)
    """tokenizer.json + tokenizer_config.json of the default model (SmolLM2), exported from its GGUF.

    Parsing the GGUF takes ~5 s, so the exported files are kept (per test process) and copied.
    """
    import tempfile

    from memserve.runtime.tokenizer import load_default_tokenizer

    if not _cache:
        with tempfile.TemporaryDirectory() as tmp:
            load_default_tokenizer().save_hf(tmp)
            _cache.update({f: (Path(tmp) / f).read_bytes() for f in _TOKENIZER_FILES})
    for f in _TOKENIZER_FILES:
        (Path(out_dir) / f).write_bytes(_cache[f])


def read_config(path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


# ---- tiny GGUF files ----------------------------------------------------------------------------------------

# One type per tensor kind, so a single tiny file exercises every supported dequantizer.
MIXED_GGUF_TYPES = {
    "token_embd": "Q8_0",
    "output": "Q8_0",  # lm_head of untied models
    "attn_q": "F16",
    "attn_k": "Q4_0",
    "attn_v": "Q4_1",
    "attn_output": "Q5_0",
    "ffn_gate": "Q5_1",
    "ffn_up": "BF16",
    "ffn_down": "Q8_0",
}

_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _llama_cpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) does to q/k rows: rotate-half -> interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(hf_dir, out_path, tensor_types: dict | None = None, with_tokenizer: bool = True) -> Path:
    """Convert a tiny HF directory (from make_tiny_model) into a GGUF file the way llama.cpp's converter does.

    `tensor_types` maps a GGUF tensor kind ("attn_q", "token_embd", ...) to a GGML type name; 1-D tensors
    (norms, biases) stay F32 as in llama.cpp. Default: MIXED_GGUF_TYPES.
    """
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    cfg = read_config(hf_dir)
    types = MIXED_GGUF_TYPES if tensor_types is None else tensor_types
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}[cfg["model_type"]]
    rope = cfg.get("rope_parameters") or {}
    w = gguf.GGUFWriter(str(out_path), arch)
    w.add_name(hf_dir.name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_vocab_size(cfg["vocab_size"])
    if with_tokenizer:
        tok = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = dict(tok["model"]["vocab"])
        for a in tok["added_tokens"]:
            vocab[a["content"]] = a["id"]
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        special = {a["content"] for a in tok["added_tokens"] if a["special"]}
        merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
        tcfg = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(tokens)
        w.add_token_types([3 if t in special else 1 for t in tokens])
        w.add_token_merges(merges)
        w.add_bos_token_id(vocab[tcfg["bos_token"]])
        w.add_eos_token_id(vocab[tcfg["eos_token"]])
        w.add_pad_token_id(vocab[tcfg["pad_token"]])
        w.add_add_bos_token(False)
        if tcfg.get("chat_template"):
            w.add_chat_template(tcfg["chat_template"])
    state = load_file(str(hf_dir / "model.safetensors"))
    for name in sorted(state, key=_gguf_order):
        t = state[name].astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = _llama_cpp_permute(t, cfg["num_attention_heads"])
        elif arch == "llama" and name.endswith("k_proj.weight"):
            t = _llama_cpp_permute(t, cfg["num_key_value_heads"])
        gname = _gguf_name(name)
        qtype = "F32" if t.ndim == 1 else types.get(gname.split(".")[-2], "F32")
        qt = gguf.GGMLQuantizationType[qtype]
        data = gguf.quants.quantize(np.ascontiguousarray(t), qt)
        w.add_tensor(gname, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def _gguf_name(hf: str) -> str:
    if hf in _GGUF_NAMES:
        return _GGUF_NAMES[hf]
    parts = hf.split(".")  # model.layers.N.<module...>.weight|bias
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{_GGUF_BLOCK[module]}.{parts[-1]}"


def _gguf_order(hf: str):
    parts = hf.split(".")
    return (int(parts[2]) if parts[1] == "layers" else -1, hf)


# ---- tiny memory-layer models (issue 16) --------------------------------------------------------------------

MEMORY_DEFAULTS = dict(layers=[0, 2], n_keys=8, heads=2, knn=4, k_dim=16, v_dim=48)


def make_tiny_memory_model(tmp_dir, mode: str = "parallel", shared_values: bool = True, swilu: bool = True,
                           value_proj: bool = True, query_bias: bool = True, seed: int = 0,
                           table_dtype=torch.float32, with_tokenizer: bool = True, **memory) -> Path:
    """A tiny Llama (3 layers, hidden 64) with memory layers in the issue-16 checkpoint format.

    The dense tensors go to model-00001-of-00002.safetensors, the value table(s) to their own
    model-00002-of-00002.safetensors (+ model.safetensors.index.json), as a real memory model would
    store them to be memory-mapped alone. `memory` overrides MEMORY_DEFAULTS (layers, n_keys, heads,
    knn, k_dim, v_dim); `value_proj=False` forces v_dim = hidden (identity); `table_dtype=torch.int8`
    writes int8 rows + per-row scales. "replace" drops the memory
    layers' mlp.* tensors. Weights are seeded random with std chosen so the memory output is of the
    order of the MLP's (a dropped memory changes greedy tokens)."""
    from safetensors.torch import load_file, save_file

    out = make_tiny_model(tmp_dir, "llama", seed=seed, with_tokenizer=with_tokenizer)
    cfg = read_config(out)
    hidden = cfg["hidden_size"]
    m = dict(MEMORY_DEFAULTS, **memory)
    if not value_proj:
        m["v_dim"] = hidden
    mem_cfg = dict(m, mode=mode, shared_values=shared_values, swilu=swilu)
    state = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    g = torch.Generator().manual_seed(seed + 16)

    def r(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=g)).contiguous()

    n, H, kd, vd = m["n_keys"], m["heads"], m["k_dim"], m["v_dim"]
    tables = {}
    for i in m["layers"]:
        p = f"model.layers.{i}."
        if mode == "replace":
            for k in [k for k in state if k.startswith(p + "mlp.")]:
                del state[k]
        state[p + "memory.query_proj.weight"] = r(H * kd, hidden, std=0.3)
        if query_bias:
            state[p + "memory.query_proj.bias"] = r(H * kd, std=0.3)
        state[p + "memory.keys"] = r(H, 2, n, kd // 2, std=0.5)
        if value_proj:
            state[p + "memory.value_proj.weight"] = r(hidden, vd, std=0.3)
        if swilu:
            state[p + "memory.swilu_proj.weight"] = r(vd, hidden, std=0.3)
        name = "model.memory_values.weight" if shared_values else p + "memory.values.weight"
        if name not in tables:
            t = r(n * n, vd, std=1.0)
            if table_dtype == torch.int8:  # int8 rows + per-row scales (…values.scales)
                from memserve.kernels import quantize_rows_int8

                tables[name], tables[name.removesuffix(".weight") + ".scales"] = quantize_rows_int8(t)
            else:
                tables[name] = t.to(table_dtype)
    files = {"model-00001-of-00002.safetensors": state, "model-00002-of-00002.safetensors": tables}
    weight_map = {}
    for fname, tensors in files.items():
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map |= {k: fname for k in tensors}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg["memory_layers"] = mem_cfg
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def prefill_logits(llm, ids: list[int]) -> torch.Tensor:
    """The engine's logits (T, V) for one prompt through its paged forward (blocks taken and given back)."""
    from memserve.runtime.attention import AttentionMetadata

    eng = llm.engine
    table = eng.allocator.allocate("logits", len(ids))
    try:
        meta = AttentionMetadata.build(["logits"], [len(ids)], [0], [table], eng.allocator.block_size)
        return eng.model.forward(torch.tensor(ids), meta, eng.attn, None)
    finally:
        eng.allocator.free("logits")


def fail_next_forwards(engine, make_exc) -> dict:
    """Make an LLMEngine's step compute raise `make_exc()` while the returned counter's "n" > 0 (each
    failing step takes one). Wraps LLMEngine._run, so whichever path computes the step fails: Model.forward
    or the single-token decode fast path (runtime/decode_step.py), which does not call Model.forward."""
    real = engine._run
    left = {"n": 0}

    def run(plan):
        if left["n"] > 0:
            left["n"] -= 1
            raise make_exc()
        return real(plan)

    engine._run = run
    return left
