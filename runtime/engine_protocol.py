"""The engine contract the serving layer (deploy/) relies on, written down once.

`AsyncLLMEngine` (runtime/async_engine.py) and the serving test double
(tests/deploy/serving_fake_engine.py) both implement it; tests/runtime/test_engine_protocol.py runs
one conformance module against both (signatures, streams, abort, queue bound, sessions, stats,
failing steps and health, drain) and checks that deploy/ calls only these members on an engine.

Errors are the runtime's own (runtime/errors.py), mapped to gRPC codes in deploy/worker.py:
InvalidRequestError -> INVALID_ARGUMENT, SessionNotFoundError -> NOT_FOUND, QueueFullError ->
RESOURCE_EXHAUSTED, DataLossError -> DATA_LOSS, EngineStepError -> UNAVAILABLE (DependencyUnavailableError,
raw or as its __cause__, e.g. a memory shard that stayed down -> UNAVAILABLE naming it),
SessionsUnsupportedError -> UNIMPLEMENTED. After `shutdown()` (the drain) the engine is unavailable:
`stats()` raises EngineDrainingError (an EngineStepError, so UNAVAILABLE; the health probe reads
NOT_SERVING) and `generate` / `ingest` raise it at the first `__anext__` instead of hanging.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

# upper bounds (seconds) of the per-read memory-lookup histogram buckets (+Inf last), Prometheus-style: the
# engine's LookupStats (runtime/ffn.py) counts into them, deploy/metrics.py's histogram uses the same bounds
LOOKUP_SECONDS_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0)


@runtime_checkable
class OutputLike(Protocol):
    """What one item of `generate` carries (runtime/outputs.RequestOutput has more)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every output token so far
    new_token_ids: list[int]  # since the previous item
    new_text: str
    finish_reason: str | None  # None until the last item: "stop" | "length" | "abort"
    num_cached_tokens: int
    metrics: Any  # arrival_time / first_scheduled_time (seconds) or None


@runtime_checkable
class StatsLike(Protocol):
    """What `stats()` returns (runtime/engine.EngineStats has more); read by deploy/metrics.py."""

    num_running: int
    num_waiting: int
    kv_cache_usage_perc: float  # 0..1 of the KV pool
    num_free_blocks: int
    num_total_blocks: int
    kv_memory_bytes: dict[str, int]  # tier ("device", "memory", ...) -> bytes in use
    sessions_active: int  # sessions in this replica's RAM
    blocks_retrieved_total: int
    memory_lookups_total: int  # memory-layer value reads (all memory layers together); 0 for dense models
    memory_lookup_seconds_total: float  # seconds spent on those reads
    # per memory layer: [(reads, seconds) per bucket of LOOKUP_SECONDS_BUCKETS, +Inf last]; {} if dense
    memory_lookup_layers: dict[int, list[tuple[int, float]]]


@runtime_checkable
class ServingEngine(Protocol):
    """An async engine one serving replica owns. Every session method runs on the engine's own
    thread (one owner of engine state); none blocks the event loop for a step."""

    tokenizer: Any  # apply_chat_template(messages, add_generation_prompt) / encode(text, ...) or None

    def __init__(self, model: str, *, max_waiting: int, **engine_args: Any) -> None: ...

    def generate(self, prompt: str | list[int], params: Any, request_id: str,
                 session_id: str | None = None, coalesce: bool = False) -> AsyncIterator[OutputLike]:
        """One item per generated token (the last has finish_reason); with `coalesce`, each item
        merges every output produced since the previous item (runtime/outputs.merge_outputs: deltas
        joined, cumulative fields of the newest), so a slow consumer gets fewer items with the same
        tokens and text, and an item is never held back waiting for more. Outputs are produced
        whether or not the consumer keeps up. Bad input raises InvalidRequestError at the first
        `__anext__` (creating the iterator never raises); a full waiting queue QueueFullError. Closing the iterator aborts the request and frees
        its KV blocks. On a session, continues from (and afterwards updates) its memory; an unknown
        session is opened (the test double's open_unknown_sessions=False answers SessionNotFoundError
        instead, to expose misrouting); a session with a running request -> InvalidRequestError
        (field session_id); an engine without sessions -> SessionsUnsupportedError. A failing step
        raises EngineStepError in the streams of that step's requests only. After shutdown():
        EngineDrainingError at the first `__anext__`."""
        ...

    async def abort(self, request_id: str) -> None:
        """The request's stream ends with an output whose finish_reason is "abort". Idempotent;
        unknown ids are ignored."""
        ...

    def ingest(self, session_id: str, prompt: str | list[int]) -> AsyncIterator[dict]:
        """Appends the document to the session (opened if unknown). Progress dicts {"tokens_done",
        "tokens_total"} counting the session's tokens; the last has "done": True and tokens_done ==
        tokens_total. After shutdown(): EngineDrainingError at the first `__anext__`."""
        ...

    async def get_session(self, session_id: str) -> dict:
        """{"session_id": str, "num_tokens": int, "bytes": {tier: int}, "busy": bool, ...};
        SessionNotFoundError if unknown. Every session method: SessionsUnsupportedError without
        sessions."""
        ...

    async def delete_session(self, session_id: str) -> None:
        """SessionNotFoundError if unknown."""
        ...

    async def list_sessions(self) -> list[dict]:
        """Info dicts of every session this engine can serve (RAM and its snapshot store)."""
        ...

    async def resident_sessions(self) -> list[str]:
        """Ids of the sessions held in this replica's RAM (affinity routing prefers their holder); []
        when the engine has no sessions."""
        ...

    def stats(self) -> StatsLike:
        """Raises (RuntimeError) when the engine is unhealthy -- its loop died, or its last 3 steps
        failed: the replica's health check; EngineDrainingError once shutdown() began (a drained
        replica is NOT_SERVING)."""
        ...

    def model_info(self) -> dict:
        """{"name", "vocab_size", "max_model_len", "block_size", ...} (GetModelInfo)."""
        ...

    def shutdown(self) -> None:
        """Drain: what runs ends with finish_reason "abort", sessions are snapshotted (with a store),
        the engine stops; from its start new work is refused (EngineDrainingError). Idempotent."""
        ...
