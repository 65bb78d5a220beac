"""The engine's configuration (EngineArgs, validated on construction) and its stats snapshot (EngineStats)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass(slots=True)
class EngineArgs:
    """Engine configuration (validated here; the serving layer's pydantic config maps onto it)."""

    device: str = "cpu"
    # "auto": fp32 on CPU, bf16 on CUDA. CPU bf16 is not offered: its speed depends on the CPU (an
    # earlier AVX2-only session measured bf16 matmul 0.33 GFLOP/s vs 124 fp32; the AVX512-BF16/AMX Xeon of
    # 2026-12-03 ran a 576x1536 bf16 linear at 0.9x fp32's time for 1 row and 0.28x for 64-512 rows), and
    # the engine's CPU attention and KV-memory paths are checked in fp32 only; the int8/int4 weight paths
    # are the CPU's reduced-precision options (int4 already runs its matmul on bf16 activations)
    dtype: str = "auto"
    # None | "int8": int8 linears (per-output-channel weight scales, dynamically quantized
    # activations — runtime/quant.py says why not weight-only) | "int4": int4 weight-only linears
    # (runtime/quant_int4.py; GGUF Q4_0/Q4_1 codes kept as stored, bf16 activations) for calls of at
    # most int4_max_tokens rows, a second copy (int4_large_kernel: "int8" | "fp32" | "none") for larger
    # ones; int4_group: 32 (llama.cpp's Q4 group) | 64 | 128 | 256, dividing every input size
    quantization: str | None = None
    int4_group: int = 32
    int4_large_kernel: str = "int8"
    int4_max_tokens: int = 4
    max_num_seqs: int = 16
    # token budget of one step; longer prompts are prefilled in chunks of at most this many tokens
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    # KV pool size: a byte budget, or an explicit block count (wins when set)
    kv_cache_bytes: int = 1 << 30
    num_kv_blocks: int | None = None
    # cap on prompt + output tokens (default: the model's max_position_embeddings)
    max_model_len: int | None = None
    progress: bool = True
    # KV memory (runtime/kv_memory_backend.py): "off" | "auto" (memory only for requests that do not fit
    # max_model_len) | "retrieval" (every request); kv_memory_config overrides KVMemoryConfig /
    # RetrievalPolicy fields, e.g. {"n_local": 2048, "topk": 16, "compression": "int4"}
    kv_memory: str = "auto"
    kv_memory_config: dict | None = None
    # per-model KV-memory tuning (runtime/kv_memory/profiles.py): None = chosen by the model's name and
    # shape, "none" = KVMemoryConfig's plain defaults, or a profile's name; kv_memory_config wins over it
    kv_memory_profile: str | None = None
    # replica-wide byte budget of the KV memory's compressed tier, over all sequences and sessions
    # (runtime/kv_memory/budget.py; None = unbounded). At the limit idle sessions are parked through
    # KVMemoryManager.park_session (if set), then least-often-selected blocks are evicted; policy
    # "refuse" also refuses (MemoryTierFullError) or holds back requests whose memory would not fit
    kv_memory_tier_bytes: int | None = None
    kv_memory_tier_policy: str = "evict"
    # durable sessions (runtime/durable_sessions.py): snapshot store URL (a directory, file://, memory://,
    # s3://...; None = sessions in RAM only). With a store, idle sessions are parked (freed from RAM, kept
    # in the store) when the memory tier reaches kv_memory_tier_bytes
    session_store: str | None = None
    # torch intra-op CPU threads for this process (None: torch's default); benchmarks report it
    threads: int | None = None
    # single-stream decode (one sequence, one new token, dense paged KV; memory layers' FFNs via a hook) through
    # runtime/decode_step.py: "native" (the step as one C++ call, kernels/cpu_decode.py: CPU, fp32 or int4
    # linears; built on first use, ~1 min; falls back to "eager" where it does not apply or cannot be built)
    # | "eager" | "compile" (torch.compile, inductor + C++ wrapper; compiled on the first such step, seconds
    # in `decode_compile_seconds`) | "off" (Model.forward for every step)
    decode_path: str = "native"

    def __post_init__(self):
        assert self.device in ("cpu", "cuda") or self.device.startswith("cuda:"), \
            f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}"
        assert self.dtype == "auto" or self.dtype in _DTYPES, f"dtype must be 'auto' or one of {sorted(_DTYPES)}"
        if self.device == "cpu":
            assert self.torch_dtype == torch.float32, \
                "dtype on CPU must be float32 (CPU attention paths are fp32-only); use quantization='int8' or 'int4' to save memory"
        else:
            assert self.torch_dtype in (torch.bfloat16, torch.float16), "dtype on CUDA must be bf16 or fp16"
        assert self.quantization in (None, "int8", "int4"), \
            f"quantization must be None, 'int8' or 'int4', got {self.quantization!r}"
        assert self.quantization is None or self.device == "cpu", \
            f"quantization={self.quantization!r} (fbgemm int8 / torch int4 CPU linears) is a CPU path; use bf16/fp16 on CUDA"
        self.int4_options()  # raises ValueError naming the int4_* field to change
        assert self.session_store is None or self.kv_memory != "off", "session_store needs kv_memory 'auto' or 'retrieval'"
        assert self.threads is None or self.threads >= 1, f"threads must be None or >= 1, got {self.threads!r}"
        assert self.decode_path in ("native", "eager", "compile", "off"), \
            f"decode_path must be 'native', 'eager', 'compile' or 'off', got {self.decode_path!r}"
        assert self.max_num_seqs >= 1, "max_num_seqs must be >= 1"
        assert self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1"
        assert self.block_size >= 1, "block_size must be >= 1"
        assert self.kv_cache_bytes > 0, "kv_cache_bytes must be > 0"
        assert self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks must be >= 1"
        assert self.max_model_len is None or self.max_model_len >= 2, "max_model_len must be >= 2"
        assert self.kv_memory in ("off", "auto", "retrieval"), \
            f"kv_memory must be 'off', 'auto' or 'retrieval', got {self.kv_memory!r}"
        assert self.kv_memory_tier_bytes is None or self.kv_memory_tier_bytes > 0, \
            "kv_memory_tier_bytes must be None or > 0"
        assert self.kv_memory_tier_policy in ("evict", "refuse"), \
            f"kv_memory_tier_policy must be 'evict' or 'refuse', got {self.kv_memory_tier_policy!r}"

    def int4_options(self):
        from .quant_int4 import Int4Options

        try:
            return Int4Options(self.int4_group, self.int4_large_kernel, self.int4_max_tokens)
        except ValueError as e:
            raise ValueError(f"{e} (EngineArgs.int4_group / int4_large_kernel / int4_max_tokens)") from None

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if self.device == "cpu" else torch.bfloat16
        return _DTYPES[self.dtype]


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage_perc: float  # 0..1
    num_free_blocks: int
    num_total_blocks: int
    kv_memory_bytes: dict[str, int] = field(default_factory=dict)  # tier -> bytes in use
    sessions_active: int = 0
    blocks_retrieved_total: int = 0
    num_preemptions_total: int = 0
    # memory layers (issue 16): value-table reads, one per memory layer per forward, summed over layers
    memory_lookups_total: int = 0
    memory_lookup_seconds_total: float = 0.0  # time spent in / waiting on those reads
    # per memory layer: [(reads, seconds) per bucket of engine_protocol.LOOKUP_SECONDS_BUCKETS (+Inf last)]
    memory_lookup_layers: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
