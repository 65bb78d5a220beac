"""Server-side bounds on what one request may ask for (issue 20), checked once at the edge (the
ingress, for gRPC and the HTTP API alike) before anything reaches an engine replica.

Every bound has a default that a laptop survives and a flag / AppConfig field (`AppConfig.limits`,
`memserve serve --limit NAME=VALUE`). A request beyond a bound gets INVALID_ARGUMENT (the request
itself is malformed or too big) or RESOURCE_EXHAUSTED (a tenant's quota / concurrency), with a
message that names the limit and its value, e.g.
"sampling.max_tokens: at most 8192 (limit max_tokens_kv_memory), got 1000000000".

Why `max_tokens` needs one: without it a request with max_tokens = 10^9 and ignore_eos generates
until the end of time (vLLM GHSA-3mwp-wvh9-7528 is this class).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

# Client session ids become store keys (runtime/sessions.py) and internal ids "tenant:session":
# no path characters, no ':' (the tenant separator), bounded.
SESSION_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
SESSION_ID_RULE = "1 to 128 characters from [A-Za-z0-9._-]"
TENANT_RE = re.compile(r"[A-Za-z0-9_-]+")
DEFAULT_TENANT = "default"


class Limits(BaseModel):
    """Bounds per request and per tenant. None = off (only where documented)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(None, ge=1, description="Cap on sampling.max_tokens. None: the model's context "
                                   "(max_model_len) when the KV memory is off, else max_tokens_kv_memory.")
    max_tokens_kv_memory: int = Field(8192, ge=1, description="Cap on sampling.max_tokens when the KV memory is on "
                                      "(then the context is not a bound: sequences grow into the memory tier).")
    max_prompt_bytes: int = Field(4 << 20, ge=1, description="UTF-8 bytes of a prompt (all messages' contents "
                                  "together for a chat).")
    max_prompt_tokens: int = Field(1 << 20, ge=1, description="Entries of prompt_token_ids (text prompts are "
                                   "bounded by bytes; the engine refuses what does not fit its context/memory).")
    max_messages: int = Field(512, ge=1, description="Messages of one chat request.")
    max_stop: int = Field(16, ge=0, description="Stop strings of one request (the HTTP API keeps OpenAI's 4).")
    max_stop_len: int = Field(256, ge=1, description="Characters of one stop string.")
    max_stop_token_ids: int = Field(64, ge=0, description="Entries of sampling.stop_token_ids.")
    max_ingest_bytes: int = Field(64 << 20, ge=1, description="UTF-8 bytes of an Ingest text / 4 bytes per token id.")
    max_request_bytes: int = Field(64 << 20, ge=1024, description="Serialized size of one request message. Also "
                                   "the gRPC receive limit of Serve's proxy (RAY_SERVE_GRPC_MAX_MESSAGE_SIZE, set "
                                   "for the local cluster by `memserve serve`; Ray's default is 2 GiB).")
    max_streams_per_tenant: int = Field(64, ge=1, description="Concurrent Generate/Ingest streams of one tenant "
                                        "per ingress replica (RESOURCE_EXHAUSTED beyond).")
    max_sessions_per_tenant: int = Field(1024, ge=1, description="Sessions one tenant may hold (RESOURCE_EXHAUSTED "
                                         "when a request would open one more).")
    max_memory_bytes_per_tenant: int | None = Field(None, ge=1, description="Memory-tier bytes of one tenant's "
                                                    "sessions together (as GetSession reports them); None = off.")


def fail(code: str, field: str, what: str):
    from memserve.deploy.ingress import RpcError

    return RpcError(code, f"{field}: {what}")


def check_session_id(session_id: str, field: str = "session_id") -> None:
    if not SESSION_ID_RE.fullmatch(session_id):
        shown = session_id if len(session_id) <= 40 else session_id[:40] + "..."
        raise fail("INVALID_ARGUMENT", field, f"must be {SESSION_ID_RULE} (no path characters), got {shown!r}")


def over(code: str, field: str, limit: str, value: int, got: int, unit: str = ""):
    return fail(code, field, f"at most {value}{unit} (limit {limit}), got {got}{unit}")


def check_request_size(request, limits: Limits) -> None:
    n = request.ByteSize()
    if n > limits.max_request_bytes:
        raise over("RESOURCE_EXHAUSTED", "request", "max_request_bytes", limits.max_request_bytes, n, " bytes")


def check_generate(request, limits: Limits, *, max_tokens_cap: int, cap_name: str) -> None:
    """Bounds of a GenerateRequest (memserve_pb2) beyond the field checks in ingress.validate_generate."""
    check_request_size(request, limits)
    if request.prompt:
        n = len(request.prompt.encode("utf-8", "surrogatepass"))
        if n > limits.max_prompt_bytes:
            raise over("INVALID_ARGUMENT", "prompt", "max_prompt_bytes", limits.max_prompt_bytes, n, " bytes")
    if len(request.messages) > limits.max_messages:
        raise over("INVALID_ARGUMENT", "messages", "max_messages", limits.max_messages, len(request.messages), " messages")
    if request.messages:
        n = sum(len(m.content.encode("utf-8", "surrogatepass")) for m in request.messages)
        if n > limits.max_prompt_bytes:
            raise over("INVALID_ARGUMENT", "messages", "max_prompt_bytes", limits.max_prompt_bytes, n, " bytes")
    if len(request.prompt_token_ids) > limits.max_prompt_tokens:
        raise over("INVALID_ARGUMENT", "prompt_token_ids", "max_prompt_tokens", limits.max_prompt_tokens,
                   len(request.prompt_token_ids), " tokens")
    s = request.sampling
    if s.HasField("max_tokens") and s.max_tokens > max_tokens_cap:
        raise over("INVALID_ARGUMENT", "sampling.max_tokens", cap_name, max_tokens_cap, s.max_tokens)
    if len(s.stop) > limits.max_stop:
        raise over("INVALID_ARGUMENT", "sampling.stop", "max_stop", limits.max_stop, len(s.stop), " strings")
    for i, x in enumerate(s.stop):
        if not x:
            raise fail("INVALID_ARGUMENT", f"sampling.stop[{i}]", "must not be empty")
        if len(x) > limits.max_stop_len:
            raise over("INVALID_ARGUMENT", f"sampling.stop[{i}]", "max_stop_len", limits.max_stop_len, len(x), " characters")
    if len(s.stop_token_ids) > limits.max_stop_token_ids:
        raise over("INVALID_ARGUMENT", "sampling.stop_token_ids", "max_stop_token_ids", limits.max_stop_token_ids,
                   len(s.stop_token_ids), " ids")


def check_ingest(request, limits: Limits) -> None:
    check_request_size(request, limits)
    n = len(request.text.encode("utf-8", "surrogatepass")) if request.text else 4 * len(request.token_ids)
    if n > limits.max_ingest_bytes:
        raise over("INVALID_ARGUMENT", "text" if request.text else "token_ids", "max_ingest_bytes",
                   limits.max_ingest_bytes, n, " bytes")
