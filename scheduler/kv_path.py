"""Which KV path a request takes -- the paged dense cache or the retrieval KV memory -- and how a memory
sequence's prefill tokens of one step are cut into chunks. Policy, pure CPU (no torch): the runtime's
KV-memory manager asks `wants_kv_memory` once per request, and the memory backend executes the chunks
`prefill_chunks` lists (runtime/kv_memory_backend.py).

Memory vs dense (decided once, when a request is added):
  * a request on a session always uses the memory (its earlier tokens live only there);
  * else the request's override ("off" | "retrieval") wins;
  * else engine mode "retrieval": every request; "auto": requests whose prompt + max_tokens does not fit
    the dense capacity (max_model_len: model window and KV pool) -- everything that fits stays on the
    exact dense path, longer contexts engage the memory by themselves.
Chunk size: a memory sequence prefills in sub-chunks of `chunk_size` tokens once the step reaches the
memory's engaged region (past `dense_limit`: sinks + local window), so working memory stays bounded (the
logits of one chunk are chunk x columns); a step that stays inside the dense region runs in one piece
(it is plain attention there)."""

from __future__ import annotations

KV_MODES = ("off", "auto", "retrieval")


def wants_kv_memory(mode: str, num_prompt_tokens: int, max_tokens: int, max_model_len: int,
                    override: str | None = None, on_session: bool = False) -> bool:
    """Whether a request runs on the retrieval KV memory (True) or the paged dense cache (False).
    Raises ValueError for a session request that asks for the dense path."""
    if mode not in KV_MODES:
        raise ValueError(f"kv_memory mode must be one of {KV_MODES}, got {mode!r}")
    if override not in (None, "off", "retrieval"):
        raise ValueError(f"the kv_memory override must be 'off' or 'retrieval', got {override!r}")
    if on_session:
        if override == "off":
            raise ValueError("a request on a session always uses the KV memory")
        return True
    if override is not None:
        return override == "retrieval"
    if mode != "auto":
        return mode == "retrieval"
    return num_prompt_tokens + max_tokens > max_model_len


def prefill_chunks(num_computed: int, num_new: int, chunk_size: int, dense_limit: int) -> list[tuple[int, int]]:
    """The (offset, length) pieces, within a step's `num_new` tokens of a memory sequence that already holds
    `num_computed`, that the memory attends one after another."""
    if num_new <= 0:
        return []
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    step = chunk_size if num_computed + num_new > dense_limit else num_new
    return [(c, min(step, num_new - c)) for c in range(0, num_new, step)]
