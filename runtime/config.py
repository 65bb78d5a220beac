"""ModelConfig: the shape of a Llama-family checkpoint, from an HF config.json or from GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UnsupportedModelError
from .memory_layers import MemoryLayersConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass(slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict | None = None  # None = plain RoPE; {"rope_type": "llama3", "factor", ...}
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = ""
    # Mistral v0.1 declares a 4096-token sliding window; the engine attends over the full context (exact
    # up to that length). Kept so callers can see it.
    sliding_window: int | None = None
    # config.json `memory_layers` (PKM / Memory+ FFN slots, issue 16); None = a dense model
    memory_layers: MemoryLayersConfig | None = None

    def __post_init__(self):
        assert self.architecture in SUPPORTED_ARCHITECTURES, self.architecture
        assert self.num_attention_heads % self.num_key_value_heads == 0, "GQA needs heads % kv_heads == 0"
        assert self.hidden_size > 0 and self.head_dim > 0 and self.num_hidden_layers > 0
        assert self.rope_scaling is None or self.rope_scaling.get("rope_type") in SUPPORTED_ROPE_TYPES

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_dict(cls, cfg: dict, name: str = "") -> ModelConfig:
        """From a parsed config.json (transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        arch = (cfg.get("architectures") or [None])[0] or _MODEL_TYPE_TO_ARCH.get(cfg.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch!r} (model_type {cfg.get('model_type')!r}) is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(
                f"hidden_act {cfg['hidden_act']!r} is not supported; supported: 'silu'"
            )
        if arch == "LlamaForCausalLM" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
            raise UnsupportedModelError(
                "Llama with attention_bias/mlp_bias (biases on o_proj / MLP) is not supported; "
                "supported: bias-free Llama, Qwen2 (q/k/v bias)"
            )
        heads = cfg["num_attention_heads"]
        rope_theta, rope_scaling = _hf_rope(cfg)
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        window = cfg.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
            window = None
        mem = cfg.get("memory_layers")
        if mem is not None and not isinstance(mem, dict):
            raise UnsupportedModelError(f"config.json memory_layers must be an object, got {type(mem).__name__}")
        mem = None if not mem else MemoryLayersConfig.from_dict(mem, cfg["hidden_size"], cfg["num_hidden_layers"])
        return cls(
            memory_layers=mem,
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=name,
            sliding_window=window,
        )


def _hf_rope(cfg: dict) -> tuple[float, dict | None]:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form; one type here
        params = params["full_attention"]
    if isinstance(params, dict):  # transformers >= 5
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:  # transformers 4.x
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = dict(cfg.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    kind = scaling.get("rope_type", "default")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if kind == "default":
        return theta, None
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if key not in scaling:
            raise UnsupportedModelError(
                f"rope_scaling type 'llama3' needs {key!r}; config has {sorted(scaling)}"
            )
    return theta, scaling
