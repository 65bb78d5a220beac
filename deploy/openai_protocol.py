"""OpenAI-compatible request/response shapes (pydantic) and their mapping onto memserve's gRPC
request, free of Ray and HTTP.

An HTTP request becomes one `memserve.v1.GenerateRequest` per choice (`n`), so the HTTP API goes
through exactly the validation, routing estimate, engine call and status codes of gRPC
(deploy/ingress.py). Field errors carry the OpenAI field name (`param`), e.g. `max_completion_tokens`
rather than the gRPC `sampling.max_tokens`.

Extensions beyond OpenAI's fields (vLLM has the same ones, except session_id): `session_id`
(continue in a memserve session's KV memory; OpenAI clients send it through `extra_body`, which is
merged into the same JSON body), `top_k`, `ignore_eos`, `return_token_ids` (each choice, and each
streamed chunk's choice, also carries the generated token ids: `token_ids`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from memserve.deploy import memserve_pb2 as pb
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_N = 8  # choices per request: each is a full engine request, so the bound protects the replicas
MAX_STOP = 4  # OpenAI's limit on stop sequences

# gRPC status name -> (HTTP status, OpenAI error type)
HTTP_STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (503, "service_unavailable"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
    "UNIMPLEMENTED": (501, "not_implemented_error"),
    "INTERNAL": (500, "server_error"),
}


class ApiError(Exception):
    """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


def from_rpc(code: str, details: str, *, renames: dict[str, str] | None = None) -> ApiError:
    """Map an ingress RpcError to an ApiError. `details` starts with the (gRPC) field name, e.g.
    "sampling.top_p: must be in (0, 1], got 1.5"; `renames` turns that into the OpenAI field."""
    status, etype = HTTP_STATUS.get(code, (500, "server_error"))
    param = None
    if code in ("INVALID_ARGUMENT", "NOT_FOUND") and ": " in details:
        head, rest = details.split(": ", 1)
        if " " not in head:
            base, bracket, rest_idx = head.partition("[")
            renamed = (renames or {}).get(base)
            param = renamed + bracket + rest_idx if renamed else head.removeprefix("sampling.")
            details = f"{param}: {rest}"
    api_code = {400: "invalid_value", 401: "invalid_api_key", 404: "not_found", 429: "rate_limit_exceeded", 503: "no_replica_available"}.get(status)
    if code == "NOT_FOUND" and (param == "session_id" or "session" in details.lower()):
        param, api_code = "session_id", "session_not_found"
    return ApiError(status, details, type=etype, param=param, code=api_code)


def from_validation(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    loc = err.get("loc") or ()
    param = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc)) or "body"
    msg = err.get("msg", "invalid")
    if err.get("type") == "missing":
        msg = "required field is missing"
    elif "input" in err and err.get("type") != "extra_forbidden":
        msg = f"{msg} (got {err['input']!r})"[:300]
    return invalid(param, msg)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    # Unknown fields are ignored (OpenAI clients send `user`, `metadata`, `store`, ...); the ones
    # that would change the answer and that memserve cannot honour are refused in `unsupported`.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # memserve / vLLM extensions
    session_id: str | None = None
    top_k: int | None = None
    ignore_eos: bool | None = None
    return_token_ids: bool = False

    def unsupported(self) -> list[tuple[str, str]]:
        out = []
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                out.append((name, "not supported by memserve (send 0 or leave it out)"))
        if self.logit_bias:
            out.append(("logit_bias", "not supported by memserve (leave it out)"))
        extra = self.model_extra or {}
        for name in ("tools", "functions", "tool_choice", "function_call", "prediction", "audio", "suffix"):
            if extra.get(name) not in (None, [], "none", ""):
                out.append((name, "not supported by memserve (leave it out)"))
        if extra.get("logprobs") or extra.get("top_logprobs"):
            name = "logprobs" if extra.get("logprobs") else "top_logprobs"
            out.append((name, "log probabilities are not supported by memserve (leave it out)"))
        rf = extra.get("response_format")
        if rf and not (isinstance(rf, dict) and rf.get("type") == "text"):
            out.append(("response_format", "only {\"type\": \"text\"} is supported"))
        if extra.get("echo"):
            out.append(("echo", "not supported by memserve (leave it out)"))
        if extra.get("best_of") not in (None, 1):
            out.append(("best_of", "only 1 is supported (use n for several choices)"))
        return out

    def check(self) -> None:
        for name, why in self.unsupported():
            raise invalid(name, why)
        if not 1 <= self.n <= MAX_N:
            raise invalid("n", f"must be in [1, {MAX_N}], got {self.n}")
        if self.n > 1 and self.session_id:
            raise invalid("n", "must be 1 with session_id (a session's KV memory grows by one answer at a time)")
        stops = self.stop_list()
        if len(stops) > MAX_STOP:
            raise invalid("stop", f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options", "only allowed when stream is true")
        if self.session_id is not None and not self.session_id:
            raise invalid("session_id", "must be a non-empty string (or left out)")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def max_tokens_field(self) -> str:
        return "max_tokens"

    def resolved_max_tokens(self) -> int | None:
        return self.max_tokens

    def sampling(self, choice: int) -> pb.SamplingParams:
        s = pb.SamplingParams()
        mt = self.resolved_max_tokens()
        if mt is not None:
            s.max_tokens = max(-(2**31), min(mt, 2**31 - 1))
        if self.temperature is not None:
            s.temperature = self.temperature
        if self.top_p is not None:
            s.top_p = self.top_p
        if self.top_k is not None:
            s.top_k = max(-(2**31), min(self.top_k, 2**31 - 1))
        if self.seed is not None:
            # choice i draws with seed + i: n seeded choices differ, and choice 0 is exactly the
            # answer gRPC gives for the same seed
            s.seed = self.seed + choice
        if self.ignore_eos is not None:
            s.ignore_eos = self.ignore_eos
        s.stop.extend(self.stop_list())
        return s

    def renames(self) -> dict[str, str]:
        return {"sampling.max_tokens": self.max_tokens_field()}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def resolved_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check(self) -> None:
        super().check()
        if self.max_completion_tokens is not None and self.max_tokens is not None \
                and self.max_completion_tokens != self.max_tokens:
            raise invalid("max_completion_tokens", "set either max_tokens or max_completion_tokens, not both")

    def chat_messages(self) -> list[pb.ChatMessage]:
        role_map = {"developer": "system"}  # OpenAI's newer name for the system role
        out = []
        for i, m in enumerate(self.messages):
            c = m.content
            if c is None:
                text = ""
            elif isinstance(c, str):
                text = c
            else:
                parts = []
                for j, part in enumerate(c):
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise invalid(f"messages[{i}].content[{j}]", "only text parts ({\"type\": \"text\", \"text\": ...}) "
                                      f"are supported, got type {part.get('type')!r}")
                    parts.append(part["text"])
                text = "".join(parts)
            out.append(pb.ChatMessage(role=role_map.get(m.role, m.role), content=text))
        return out

    def to_grpc(self, choice: int) -> pb.GenerateRequest:
        return pb.GenerateRequest(messages=self.chat_messages(), session_id=self.session_id or "",
                                  sampling=self.sampling(choice))


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]

    def to_grpc(self, choice: int) -> pb.GenerateRequest:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise invalid("prompt", f"one prompt per request (use n for several answers), got a batch of {len(p)}")
            p = p[0]
        req = pb.GenerateRequest(session_id=self.session_id or "", sampling=self.sampling(choice))
        if isinstance(p, str):
            if not p:
                raise invalid("prompt", "must be a non-empty string or list of token ids")
            req.prompt = p
        else:
            if not p:
                raise invalid("prompt", "must be a non-empty string or list of token ids")
            req.prompt_token_ids.extend(p)
        return req

    def renames(self) -> dict[str, str]:
        return {**super().renames(), "prompt_token_ids": "prompt"}


def parse(kind: Literal["chat", "completion"], body: Any) -> ChatCompletionRequest | CompletionRequest:
    """JSON body -> checked request, or ApiError(400) naming the field."""
    if not isinstance(body, dict):
        raise invalid("body", "must be a JSON object")
    cls = ChatCompletionRequest if kind == "chat" else CompletionRequest
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        raise from_validation(e) from None
    req.check()
    return req


# ---- responses ----------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_body(kind: str, rid: str, model: str, choices: list[tuple[str, str | None]], usage: dict,
                    token_ids: list[list[int]] | None = None) -> dict:
    """choices: (text, finish_reason) per index; token_ids: per index, with return_token_ids."""
    created = int(time.time())
    if kind == "chat":
        out = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": f}
               for i, (t, f) in enumerate(choices)]
        obj = "chat.completion"
    else:
        out = [{"index": i, "text": t, "logprobs": None, "finish_reason": f} for i, (t, f) in enumerate(choices)]
        obj = "text_completion"
    if token_ids is not None:
        for c, ids in zip(out, token_ids):
            c["token_ids"] = ids
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": out, "usage": usage,
            "system_fingerprint": None}


def chunk_body(kind: str, rid: str, created: int, model: str, index: int, text: str | None,
               finish_reason: str | None, *, role: bool = False, include_usage: bool = False,
               token_ids: list[int] | None = None) -> dict:
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        out = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    if include_usage:
        out["usage"] = None  # OpenAI: null on every chunk but the last when include_usage is set
    return out


def usage_chunk(kind: str, rid: str, created: int, model: str, usage: dict) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}


def models_body(names: list[str], created: int) -> dict:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "memserve"}
                                       for n in names]}
