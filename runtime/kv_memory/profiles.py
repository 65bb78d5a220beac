"""Named per-model profiles: KV-memory tuning measured on one model, applied only to that model.

A profile is a set of KVMemoryConfig / RetrievalPolicy overrides with the evidence for them. The engine
picks one by the model's name and shape (`profile_for`), applies it over KVMemoryConfig's defaults and
under the user's `kv_memory_config` (which always wins); `kv_memory_profile` in EngineArgs names one
explicitly ("none": KVMemoryConfig's plain defaults). Engine-wide defaults stay model-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class KVMemoryProfile:
    name: str
    # matched against the model: every shape field given must be equal, and if names are given the
    # model's name/source (lower-cased) must contain one of them
    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    hidden_size: int | None = None
    names: tuple[str, ...] = ()
    overrides: dict = field(default_factory=dict)
    why: str = ""

    def matches(self, name: str, num_layers: int, num_kv_heads: int, head_dim: int, hidden_size: int) -> bool:
        shape = ((self.num_layers, num_layers), (self.num_kv_heads, num_kv_heads), (self.head_dim, head_dim),
                 (self.hidden_size, hidden_size))
        if any(want is not None and want != have for want, have in shape):
            return False
        return not self.names or any(n in name.lower() for n in self.names)


PROFILES: dict[str, KVMemoryProfile] = {
    p.name: p for p in (
        KVMemoryProfile(
            "smollm2-135m", num_layers=30, num_kv_heads=3, head_dim=64, hidden_size=576,
            names=("smollm2-135m", "smollm2_135m", "smollm2"),
            # int4 memory: int8 keys in layers 18-21 answer the one int4 passkey miss (32k, depth 10%) at
            # 0.298x of fp16 KV instead of 0.281x; bisected over layers (bench/results/kv_memory_ablation.md
            # section 8). A layer index of another model means nothing, hence a profile
            # exact question-time block scoring, top-16 at those selections: varied-text 16k needles 5/6 tuned
            # (defaults 0/6), held out see bench/results/kv_memory_retrieval_16k.md; the body's prefill unchanged.
            # exact_every 100000 = one exact scoring per question (the question's chunk + the first decode step):
            # decode at 32k 1.22x its 1k (64: 1.47x; target 1.3x, kv_memory_decode_profile_every.md); answers
            # <= 64 tokens are identical by construction, and on the long-answer task (long_list, ~120 tokens,
            # tuned families, 16k d0.9) both settings score 0/12 where dense at 8k finds 10/12 (README, issue 15)
            # exact_query_tokens 1: the question's selection scores the blocks with the prompt's LAST token's
            # query instead of the mean over its 256-token chunk (mostly body text): through the engine at 16k
            # (int4, seed 0, single_number) tuned cells 4/6 -> 6/6 (dense at 8k answers 3: 1/3 -> 3/3), held out on
            # the cells dense answers unchanged 1/3 (bench/results/longctx_grid/exact_query_tokens.md); the
            # number of blocks and of exact scorings is unchanged, so decode costs the same
            overrides={"int4_int8_key_layers": (18, 19, 20, 21), "exact": "query", "exact_every": 100000,
                       "exact_topk": 16, "exact_query_tokens": 1},
            why="int8 keys in layers 18-21 with int4 memory (ablation section 8); exact question-time "
                "block scoring (kv_memory_retrieval_16k.md) with the prompt's last query (exact_query_tokens.md)"),
    )
}


def profile_for(name: str, num_layers: int, num_kv_heads: int, head_dim: int, hidden_size: int,
                requested: str | None = None) -> KVMemoryProfile | None:
    """The profile to use: `requested` by name ("none" = no profile), else the first that matches."""
    if requested is not None:
        if requested == "none":
            return None
        if requested not in PROFILES:
            raise ValueError(f"kv_memory_profile must be 'none' or one of {sorted(PROFILES)}, got {requested!r}")
        return PROFILES[requested]
    for p in PROFILES.values():
        if p.matches(name, num_layers, num_kv_heads, head_dim, hidden_size):
            return p
    return None
