"""KVMemoryConfig: the KV memory's settings (engine defaults; per-request overrides in the backend)."""

from __future__ import annotations

from dataclasses import dataclass

from memserve.scheduler.kv_policy import RetrievalPolicy

from .quant import COMPRESSIONS


@dataclass(slots=True)
class KVMemoryConfig:
    """Engine-level defaults of the KV memory (per-request overrides: mode off/retrieval, topk)."""

    n_init: int = 128  # attention sinks (InfLLM/StreamingLLM)
    # local window. InfLLM uses 4096; on SmolLM2-135M a passkey at 2k tokens with EVERY block attended
    # was found with n_local 256 / 512 and missed with 1024 (and dense misses at 4k): the fewer tokens
    # sit at a long true distance, the better this model retrieves (bench/kv_memory_probe.py).
    n_local: int = 512
    block_size: int = 64
    repr_topk: int = 4  # tokens per block that form its representative(s)
    # "max"/"mean" representatives also keep the block's `repr_outliers` keys farthest from its mean key:
    # the most-attended keys miss a token nothing attended to while it was in the window (a needle in
    # varied text) -- bench/results/kv_memory_retrieval_16k.md
    repr_outliers: int = 0
    compression: str = "int8"
    # KIVI groups, fp16 scale/min. 64/64 instead of KIVI's 32 so that int4 blocks take 0.281x of fp16 KV
    # per token (32/32: 0.31x, over the issue's <= 0.3x). Value groups of 32 (0.297x) answered the one int4
    # passkey miss (32k, depth 10%) and lost three other cells (ablation section 7); keys decide it (section 8)
    key_group: int = 64  # tokens per (scale, min) of a key channel
    value_group: int = 64  # channels per (scale, min) of a value token
    # int4 memory: layers whose keys are stored int8 (values stay int4). Model-specific, so empty here: the
    # SmolLM2-135M profile (profiles.py) sets layers 18-21 (ablation section 8); indices past a model's
    # layers are ignored
    int4_int8_key_layers: tuple[int, ...] = ()
    # int8/int4: per block and KV head, keys / values of the tokens that received the most attention while in
    # the window kept in fp16 (quant.py; 2 rows of 64 add 0.016x). Off: within 0.3x they did not
    # answer that cell (ablation section 8)
    exact_keys: int = 0
    exact_values: int = 0
    # explicit per-layer compression of the memory tier, ahead of the above: ((layer, key kind, value kind), ...)
    layer_compression: tuple[tuple[int, str, str], ...] = ()
    cache_blocks: int = 64  # LRU device cache of dequantized blocks, per layer
    budget_bytes: int | None = None  # memory-tier budget per sequence/session (all layers); None = unbounded
    # prefill chunk once the memory is engaged. Each chunk selects its blocks with its mean query, so a
    # smaller chunk follows the text more closely: 256 instead of 512 answers the passkey 32k seed-1
    # depth-90% cell that fp16, int8 and int4 memory all missed with 512, at the same prefill time
    # (229 s vs 230 s at 1 thread; ablation section 9)
    chunk_size: int = 256
    policy: RetrievalPolicy = None  # type: ignore[assignment]

    def __post_init__(self):
        if self.policy is None:
            self.policy = RetrievalPolicy()
        assert self.n_init >= 0 and self.n_local >= 1 and self.block_size >= 1
        assert 1 <= self.repr_topk <= self.block_size, "repr_topk must be in [1, block_size]"
        assert 0 <= self.repr_outliers <= self.block_size, "repr_outliers must be in [0, block_size]"
        assert not (self.repr_outliers and self.policy.repr_mode == "quest"), \
            "repr_outliers needs repr_mode 'max' or 'mean' (Quest keeps min/max bounds)"
        assert 0 <= self.exact_values <= self.block_size and 0 <= self.exact_keys <= self.block_size, \
            "exact_values and exact_keys must be in [0, block_size]"
        self.layer_compression = tuple((int(l), k, v) for l, k, v in self.layer_compression)  # JSON gives lists
        self.int4_int8_key_layers = tuple(int(l) for l in self.int4_int8_key_layers)
        kinds = {self.compression, *(x for _, k, v in self.layer_compression for x in (k, v))}
        assert kinds <= set(COMPRESSIONS), f"compression must be one of {COMPRESSIONS}"
        assert self.chunk_size >= 1 and self.cache_blocks >= 1
        if kinds & {"int8", "int4"}:
            assert self.block_size % self.key_group == 0, "block_size must be a multiple of key_group"
        if self.budget_bytes is not None:
            assert self.budget_bytes > 0

    def kinds(self, layer: int) -> tuple[str, str]:
        """(key, value) compression of a layer's memory tier."""
        for l, k, v in self.layer_compression:
            if l == layer:
                return k, v
        if self.compression == "int4" and layer in self.int4_int8_key_layers:
            return "int8", "int4"
        return self.compression, self.compression

    @property
    def dense_limit(self) -> int:
        """Sequences up to this many tokens attend exactly like dense attention."""
        return self.n_init + self.n_local

