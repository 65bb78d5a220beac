"""Errors the runtime raises for bad input; the serving layer maps each to a gRPC status code.

Every message says what was wrong and what to change.
"""


class MemServeError(Exception):
    """Base class of memserve's own errors."""


class InvalidRequestError(MemServeError, ValueError):
    """A field of a request is out of range (gRPC INVALID_ARGUMENT). `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelNotFoundError(MemServeError, FileNotFoundError):
    """The model path or name does not exist (the message lists what was looked for)."""


class UnsupportedModelError(MemServeError, ValueError):
    """The checkpoint exists but its architecture / tensor type is not supported."""


class SessionNotFoundError(MemServeError, KeyError):
    """No session with this id (gRPC NOT_FOUND)."""

    def __init__(self, session_id: str):
        super().__init__(session_id)
        self.session_id = session_id

    def __str__(self) -> str:
        return f"unknown session {self.session_id!r}: create it with Ingest or a Generate carrying session_id"


class QueueFullError(MemServeError, RuntimeError):
    """The engine's waiting queue is at its bound (gRPC RESOURCE_EXHAUSTED): retry later."""


class DataLossError(MemServeError, RuntimeError):
    """A stored session snapshot is corrupt, truncated or of another format (gRPC DATA_LOSS). The
    replica keeps serving; the session must be ingested again (or restored from a backup)."""


class MemoryTierFullError(QueueFullError):
    """The replica's KV-memory tier is at its byte budget (EngineArgs.kv_memory_tier_bytes, policy
    "refuse") and this request's memory would not fit (gRPC RESOURCE_EXHAUSTED): retry later, shorten
    the prompt, or raise the budget / use policy "evict"."""


class EngineStepError(MemServeError, RuntimeError):
    """The engine step (model forward) of this request failed (gRPC UNAVAILABLE: retrying, possibly
    on another replica, can succeed); the other requests of the engine were not affected."""


class EngineDrainingError(EngineStepError):
    """The engine was shut down (the drain of AsyncLLMEngine.shutdown): it takes no new work and its
    stats() raises this, so the health probe reads NOT_SERVING (gRPC UNAVAILABLE, through its base
    class: retry on another replica)."""

    def __init__(self, message: str = "this replica is draining (engine shut down); it takes no new "
                                      "requests, send them to another replica"):
        super().__init__(message)


class DependencyUnavailableError(MemServeError, RuntimeError):
    """A part the model forward reads from outside this process (e.g. a memory shard, deploy/
    remote_value_store.py) did not answer within its retry bound (gRPC UNAVAILABLE). `dependency`
    names it, and the message says so, so the operator knows which deployment to look at. The serving
    layer maps it by this base class, so runtime/ needs no Ray or deploy import."""

    def __init__(self, dependency: str, message: str):
        super().__init__(message)
        self.dependency = dependency


class SessionsUnsupportedError(InvalidRequestError):
    """This engine runs without the KV memory, so it has no sessions (gRPC UNIMPLEMENTED)."""

    def __init__(self, message: str = "sessions need the KV memory; start the engine with kv_memory "
                                      "'auto' or 'retrieval'"):
        super().__init__("kv_memory", message)
