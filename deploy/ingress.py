"""Ingress logic, free of Ray: validate gRPC requests, call the engine deployment, map its
answers and errors to protobuf messages and gRPC status codes.

`deploy/app.py` wraps this in a Serve deployment; tests drive it with an in-process engine client.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from memserve.deploy import memserve_pb2 as pb
from memserve.scheduler.router import estimate_tokens

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_REQUEST_ID_LEN = 128


class RpcError(Exception):
    """Ends an RPC with a gRPC status `code` (a grpc.StatusCode name) and `details`."""

    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details

    def __reduce__(self):  # crosses Ray process boundaries inside gRPCStatusError
        return (RpcError, (self.code, self.details))


class EngineStream(Protocol):
    def __aiter__(self) -> AsyncIterator[dict]: ...
    async def __anext__(self) -> dict: ...
    def cancel(self) -> None: ...


class EngineClient(Protocol):
    """How the ingress reaches engine replicas (Serve handle in production, direct in tests).
    Implementations raise RpcError for transport-level failures (UNAVAILABLE, RESOURCE_EXHAUSTED)."""

    def stream(self, method: str, *args, routing: dict) -> EngineStream: ...
    async def call(self, method: str, *args, routing: dict | None = None) -> Any: ...
    async def num_replicas(self) -> int: ...


def _raise_if_error(item: dict) -> None:
    err = item.get("error") if isinstance(item, dict) else None
    if err:
        raise RpcError(err["code"], err["message"])


def sampling_dict(s: pb.SamplingParams, sampling_cls=None) -> dict:
    """Only the fields the client set; validated by the engine's SamplingParams when available
    (its InvalidRequestError names the field; the message is prefixed with `sampling.`)."""
    d: dict[str, Any] = {}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos"):
        if s.HasField(name):
            d[name] = getattr(s, name)
    if s.stop:
        d["stop"] = list(s.stop)
    if s.stop_token_ids:
        d["stop_token_ids"] = list(s.stop_token_ids)
    if sampling_cls is not None:
        from memserve.runtime.errors import InvalidRequestError

        try:
            sampling_cls(**d)
        except InvalidRequestError as e:
            raise RpcError("INVALID_ARGUMENT", f"sampling.{e}") from None
        except TypeError as e:  # an engine without one of the fields
            raise RpcError("INVALID_ARGUMENT", f"sampling: {e}") from None
    return d


def validate_generate(request: pb.GenerateRequest, *, vocab_size: int | None, sampling_cls=None) -> dict:
    """GenerateRequest -> the engine worker's request dict, or RpcError(INVALID_ARGUMENT) naming the field."""
    given = [n for n, v in (("prompt", request.prompt), ("messages", request.messages),
                            ("prompt_token_ids", request.prompt_token_ids)) if len(v)]
    if len(given) != 1:
        raise RpcError("INVALID_ARGUMENT", "prompt: exactly one of prompt, messages, prompt_token_ids must be set "
                       f"(got {', '.join(given) if given else 'none'})")
    req: dict[str, Any] = {}
    if request.prompt:
        req["prompt"] = request.prompt
        prompt_len = max(1, len(request.prompt) // 4)  # chars per token, for load estimates only
    elif request.messages:
        msgs = []
        for i, m in enumerate(request.messages):
            if m.role not in CHAT_ROLES:
                raise RpcError("INVALID_ARGUMENT", f"messages[{i}].role: must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}")
            msgs.append({"role": m.role, "content": m.content})
        req["messages"] = msgs
        prompt_len = max(1, sum(len(m["content"]) for m in msgs) // 4)
    else:
        ids = list(request.prompt_token_ids)
        if vocab_size:
            for i, t in enumerate(ids):
                if not 0 <= t < vocab_size:
                    raise RpcError("INVALID_ARGUMENT", f"prompt_token_ids[{i}]: must be in [0, {vocab_size - 1}], got {t}")
        req["prompt_token_ids"] = ids
        prompt_len = len(ids)
    if len(request.request_id) > MAX_REQUEST_ID_LEN:
        raise RpcError("INVALID_ARGUMENT", f"request_id: at most {MAX_REQUEST_ID_LEN} characters, got {len(request.request_id)}")
    if len(request.session_id) > MAX_REQUEST_ID_LEN:
        raise RpcError("INVALID_ARGUMENT", f"session_id: at most {MAX_REQUEST_ID_LEN} characters, got {len(request.session_id)}")
    req["request_id"] = request.request_id or uuid.uuid4().hex
    req["session_id"] = request.session_id or None
    req["sampling"] = sampling_dict(request.sampling, sampling_cls)
    req["_est_tokens"] = estimate_tokens(prompt_len, int(req["sampling"].get("max_tokens", 16)))
    return req


class IngressCore:
    def __init__(self, client: EngineClient, *, unavailable_timeout_s: float = 30.0, sampling_cls=None):
        self.client = client
        self.unavailable_timeout_s = unavailable_timeout_s
        self.sampling_cls = sampling_cls
        self._vocab_size: int | None = None

    async def _vocab(self) -> int | None:
        if self._vocab_size is None:
            with contextlib.suppress(Exception):
                info = await asyncio.wait_for(self.client.call("model_info"), self.unavailable_timeout_s)
                self._vocab_size = int(info.get("vocab_size") or 0) or None
        return self._vocab_size

    async def _open(self, method: str, *args, routing: dict) -> tuple[EngineStream, dict]:
        """Start a stream and wait (bounded) until a replica accepts it."""
        stream = self.client.stream(method, *args, routing=routing)
        try:
            first = await asyncio.wait_for(stream.__anext__(), self.unavailable_timeout_s)
        except asyncio.TimeoutError:
            stream.cancel()
            raise RpcError("UNAVAILABLE", f"no engine replica accepted the request within {self.unavailable_timeout_s:g} s "
                           "(all replicas busy, starting or down); retry later") from None
        except StopAsyncIteration:
            raise RpcError("INTERNAL", "engine replica closed the stream without answering") from None
        except BaseException:
            stream.cancel()
            raise
        _raise_if_error(first)
        return stream, first

    async def generate(self, request: pb.GenerateRequest, api: str = "grpc",
                       yield_accepted: bool = False) -> AsyncIterator[pb.GenerateResponse | None]:
        """`api`: "grpc" or "http" (the OpenAI API, deploy/openai_api.py): the metrics label.
        `yield_accepted`: first yield None once a replica has accepted the request (routing done)."""
        req = validate_generate(request, vocab_size=await self._vocab() if request.prompt_token_ids else None,
                                sampling_cls=self.sampling_cls)
        req["api"] = api
        routing = {"session_id": req["session_id"], "tokens": req.pop("_est_tokens")}
        stream, _ = await self._open("generate", req, routing=routing)
        done = False
        try:
            if yield_accepted:
                yield None
            async for item in stream:
                _raise_if_error(item)
                resp = pb.GenerateResponse(request_id=req["request_id"], text=item["text"], token_ids=item["token_ids"])
                if item.get("finish_reason"):
                    resp.finish_reason = item["finish_reason"]
                    u = item.get("usage") or {}
                    resp.usage.CopyFrom(pb.Usage(prompt_tokens=u.get("prompt_tokens", 0),
                                                 completion_tokens=u.get("completion_tokens", 0),
                                                 cached_tokens=u.get("cached_tokens", 0)))
                    done = True
                yield resp
            done = True
        finally:
            if not done:  # client went away / deadline / error: stop the engine side now
                stream.cancel()

    async def ingest(self, request: pb.IngestRequest) -> AsyncIterator[pb.IngestProgress]:
        if not request.session_id:
            raise RpcError("INVALID_ARGUMENT", "session_id: required (a non-empty string up to 128 characters)")
        if bool(request.text) == bool(request.token_ids):
            raise RpcError("INVALID_ARGUMENT", "text: exactly one of text, token_ids must be set")
        data = request.text or list(request.token_ids)
        n = len(request.token_ids) or max(1, len(request.text) // 4)
        stream, _ = await self._open("ingest", request.session_id, data,
                                     routing={"session_id": request.session_id, "tokens": n})
        done = False
        try:
            async for item in stream:
                _raise_if_error(item)
                p = item["progress"]
                yield pb.IngestProgress(session_id=request.session_id, tokens_done=p["tokens_done"],
                                        tokens_total=p["tokens_total"], done=p["done"])
            done = True
        finally:
            if not done:
                stream.cancel()

    async def _session_call(self, name: str, session_id: str) -> dict:
        if not session_id:
            raise RpcError("INVALID_ARGUMENT", "session_id: required (a non-empty string up to 128 characters)")
        res = await self.client.call("call_session", name, session_id, routing={"session_id": session_id, "tokens": 0})
        _raise_if_error(res)
        return res

    async def get_session(self, request: pb.GetSessionRequest) -> pb.SessionInfo:
        res = await self._session_call("get_session", request.session_id)
        r = res.get("result") or {}
        r = r if isinstance(r, dict) else {}
        nbytes = r.get("memory_bytes", r.get("bytes", 0)) or 0
        if isinstance(nbytes, dict):  # per-tier bytes
            nbytes = sum(int(v) for v in nbytes.values())
        state = r.get("state") or ("busy" if r.get("busy") else "idle")
        return pb.SessionInfo(session_id=request.session_id, num_tokens=int(r.get("num_tokens", 0) or 0),
                              memory_bytes=int(nbytes), state=str(state), replica=str(res.get("replica", "")))

    async def delete_session(self, request: pb.DeleteSessionRequest) -> pb.DeleteSessionResponse:
        res = await self._session_call("delete_session", request.session_id)
        r = res.get("result")
        return pb.DeleteSessionResponse(deleted=bool(r) if r is not None else True)

    async def get_model_info(self, request: pb.GetModelInfoRequest) -> pb.ModelInfo:
        info = await asyncio.wait_for(self.client.call("model_info"), self.unavailable_timeout_s)
        stats = info.pop("stats", {}) or {}
        known = {"name", "model", "architecture", "vocab_size", "max_model_len", "block_size", "replica"}
        out = pb.ModelInfo(
            model=str(info.get("name") or info.get("model") or ""),
            architecture=str(info.get("architecture", "")),
            vocab_size=int(info.get("vocab_size") or 0),
            max_model_len=int(info.get("max_model_len") or info.get("max_position_embeddings") or 0),
            num_replicas=await self.client.num_replicas(),
            num_total_blocks=int(stats.get("num_total_blocks") or 0),
            num_free_blocks=int(stats.get("num_free_blocks") or 0),
            block_size=int(info.get("block_size") or 0),
            num_running=int(stats.get("num_running") or 0),
            num_waiting=int(stats.get("num_waiting") or 0),
        )
        for k, v in info.items():
            if k not in known:
                out.extra[str(k)] = str(v)
        out.extra["replica"] = str(info.get("replica", ""))
        return out
