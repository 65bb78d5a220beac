"""The engine contract the serving layer (deploy/) relies on, written down once.

`AsyncLLMEngine` (runtime/async_engine.py) and the serving test double
(tests/deploy/serving_fake_engine.py) both implement it (a shared conformance test is still to
be written). deploy/worker.py calls exactly these members, nothing found by `getattr`.

Errors are the runtime's own (runtime/errors.py), mapped to gRPC codes in deploy/worker.py:
InvalidRequestError -> INVALID_ARGUMENT, SessionNotFoundError -> NOT_FOUND, QueueFullError ->
RESOURCE_EXHAUSTED, DataLossError -> DATA_LOSS, EngineStepError -> UNAVAILABLE (DependencyUnavailableError,
raw or as its __cause__, e.g. a memory shard that stayed down -> UNAVAILABLE naming it),
SessionsUnsupportedError -> UNIMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable


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
class ServingEngine(Protocol):
    """An async engine one serving replica owns. Every session method runs on the engine's own
    thread (one owner of engine state); none blocks the event loop for a step."""

    tokenizer: Any  # apply_chat_template(messages, add_generation_prompt) / encode(text, ...) or None

    def __init__(self, model: str, *, max_waiting: int, **engine_args: Any) -> None: ...

    def generate(self, prompt: str | list[int], params: Any, request_id: str,
                 session_id: str | None = None) -> AsyncIterator[OutputLike]:
        """Bad input raises at the first `__anext__`; closing the iterator aborts the request and
        frees its KV blocks. On a session, continues from (and afterwards updates) its memory."""
        ...

    async def abort(self, request_id: str) -> None:
        """Idempotent; unknown ids are ignored."""
        ...

    def ingest(self, session_id: str, prompt: str | list[int]) -> AsyncIterator[dict]:
        """Progress dicts {"tokens_done", "tokens_total"}; the last has "done": True."""
        ...

    async def get_session(self, session_id: str) -> dict:
        """{"session_id", "num_tokens", "bytes", ...}; SessionNotFoundError if unknown."""
        ...

    async def delete_session(self, session_id: str) -> None:
        """SessionNotFoundError if unknown."""
        ...

    async def list_sessions(self) -> list[dict]:
        """Info dicts of every session this engine can serve (RAM and its snapshot store)."""
        ...

    async def resident_sessions(self) -> list[str]:
        """Ids of the sessions held in this replica's RAM (affinity routing prefers their holder)."""
        ...

    def stats(self) -> Any:
        """EngineStats-like (num_running, num_waiting, kv_cache_usage_perc, num_free_blocks,
        num_total_blocks, kv_memory_bytes, sessions_active, blocks_retrieved_total). Raises when the
        engine is unhealthy: the replica's health check."""
        ...

    def model_info(self) -> dict: ...

    def shutdown(self) -> None:
        """Drain: abort what runs, snapshot sessions, stop the engine thread."""
        ...
