"""OpenAI-compatible HTTP API on Serve's HTTP proxy (default 127.0.0.1:8000):

    POST /v1/chat/completions   POST /v1/completions   (stream: server-sent events, or one JSON body)
    GET  /v1/models

The ingress deployment (deploy/app.py) answers gRPC methods and, through its `__call__`, HTTP
requests; both go through the same IngressCore, so routing (session affinity, load), the engine
deployment's limits, status codes and the `memserve:*` metrics (label api="http") are shared. Each
choice of a request is one GenerateRequest (deploy/openai_protocol.py).

Status: the response status is decided before the first byte: a streaming request waits for its
first token (or error) before the 200 and the event stream start, so backpressure (429), an unknown
session (404) or no replica (503) arrive as HTTP statuses with OpenAI's error body, not inside a
200 stream. An error after that arrives as a `data: {"error": ...}` event, then `data: [DONE]`.

Disconnects: when the client goes away, Serve's proxy cancels the replica's handler task; the
cancellation reaches IngressCore.generate, whose `finally` cancels the engine stream, and the
engine aborts the request and frees its KV blocks (tests/deploy/test_openai.py checks the pool).

Authentication (deploy/auth.py): `Authorization: Bearer KEY` is checked in `OpenAIServer.__call__`
before routing, by the same IngressCore.authenticate as gRPC's metadata; a missing or wrong key is
401 with OpenAI's error body (the openai client raises AuthenticationError). Limits
(deploy/limits.py) are IngressCore's, so HTTP and gRPC share them; the raw body is bounded by
limits.max_request_bytes before it is parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable

from memserve.deploy import openai_protocol as P
from memserve.deploy.ingress import IngressCore, RpcError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


_DONE = b"data: [DONE]\n\n"


class OpenAIServer:
    """HTTP handlers over an IngressCore. `aliases`: further model names accepted in `model`
    (the configured model string, e.g. "default" or a path); `on_error(code)` counts errors."""

    def __init__(self, core: IngressCore, *, aliases: list[str] = (), on_error: Callable[[str], None] | None = None):
        self.core = core
        self.aliases = [a for a in aliases if a]
        self.on_error = on_error or (lambda code: None)
        self._names: list[str] | None = None
        self._created = int(time.time())

    # ---- entry point ----------------------------------------------------------------------------
    async def __call__(self, request):
        from starlette.responses import JSONResponse

        path = request.scope.get("path", "/")
        root = request.scope.get("root_path", "")
        if root and root != "/" and path.startswith(root):
            path = path[len(root):]
        path = "/" + path.strip("/")
        routes = {"/v1/chat/completions": ("POST", "chat"), "/v1/completions": ("POST", "completion"),
                  "/v1/models": ("GET", "models")}
        try:
            client = request.scope.get("client")
            tenant = self.core.authenticate(request.headers.get("authorization"), client[0] if client else None)
            if path not in routes:
                raise P.ApiError(404, f"no route {path}; this server offers POST /v1/chat/completions, "
                                 "POST /v1/completions and GET /v1/models", type="not_found_error", code="unknown_url")
            method, kind = routes[path]
            if request.method != method:
                raise P.ApiError(405, f"{path} takes {method}, got {request.method}", code="method_not_allowed")
            if kind == "models":
                return JSONResponse(P.models_body((await self.model_names())[:1], self._created))
            raw = await request.body()
            cap = self.core.limits.max_request_bytes
            if len(raw) > cap:
                raise P.invalid("body", f"at most {cap} bytes (limit max_request_bytes), got {len(raw)} bytes")
            try:
                body = json.loads(raw or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise P.invalid("body", f"not valid JSON ({e})") from None
            return await self.generate(kind, body, tenant)
        except P.ApiError as e:
            return self._error_response(e)
        except RpcError as e:
            return self._error_response(P.from_rpc(e.code, e.details))
        except asyncio.CancelledError:
            self.on_error("CANCELLED")
            raise
        except Exception as e:  # noqa: BLE001 - an OpenAI-shaped 500 instead of Serve's plain text
            return self._error_response(P.ApiError(500, f"{type(e).__name__}: {e}", type="server_error"))

    def _error_response(self, e: P.ApiError):
        from starlette.responses import JSONResponse

        self.on_error(_grpc_code_of(e.status))
        return JSONResponse(e.body(), status_code=e.status)

    async def model_names(self) -> list[str]:
        if self._names is None:
            try:
                info = await asyncio.wait_for(self.core.client.call("model_info"), self.core.unavailable_timeout_s)
            except asyncio.TimeoutError:
                raise RpcError("UNAVAILABLE", f"no engine replica answered within {self.core.unavailable_timeout_s:g} s") from None
            name = str(info.get("name") or info.get("model") or (self.aliases[0] if self.aliases else "memserve"))
            self._names = [name] + [a for a in self.aliases if a != name]
        return self._names

    # ---- completions ----------------------------------------------------------------------------
    async def generate(self, kind: str, body, tenant: str = "default"):
        from starlette.responses import JSONResponse, StreamingResponse

        req = P.parse(kind, body)
        names = await self.model_names()
        if req.model not in names:
            raise P.ApiError(404, f"model: {req.model!r} is not served here; GET /v1/models lists {names[0]!r}",
                             type="not_found_error", param="model", code="model_not_found")
        grpc_reqs = [req.to_grpc(i) for i in range(req.n)]
        renames = req.renames()
        model = req.model
        streams = [self.core.generate(g, api="http", yield_accepted=True, tenant=tenant) for g in grpc_reqs]
        try:
            firsts = await _first_of_all(streams)
        except RpcError as e:
            raise P.from_rpc(e.code, e.details, renames=renames) from None
        if req.stream:
            return StreamingResponse(self._events(kind, req, model, streams, firsts, renames),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            results = await _gather_cancelling([_collect(s, f) for s, f in zip(streams, firsts)])
        except RpcError as e:
            raise P.from_rpc(e.code, e.details, renames=renames) from None
        usage = _usage([u for _, _, u, _ in results])
        ids = [i for _, _, _, i in results] if req.return_token_ids else None
        return JSONResponse(P.completion_body(kind, P.new_id(kind), model, [(t, f) for t, f, _, _ in results], usage, ids))

    async def _events(self, kind, req, model, streams, firsts, renames) -> AsyncIterator[bytes]:
        rid, created, inc = P.new_id(kind), int(time.time()), req.include_usage()
        ids = req.return_token_ids
        usages: list = [None] * len(streams)
        try:
            if kind == "chat":
                for i in range(len(streams)):
                    yield _sse(P.chunk_body(kind, rid, created, model, i, "", None, role=True, include_usage=inc))
            async for i, msg in _merged(streams, firsts):
                fin = msg.finish_reason or None
                if kind == "chat":
                    if msg.text:
                        yield _sse(P.chunk_body(kind, rid, created, model, i, msg.text, None, include_usage=inc,
                                                token_ids=list(msg.token_ids) if ids else None))
                    if fin:
                        yield _sse(P.chunk_body(kind, rid, created, model, i, None, fin, include_usage=inc,
                                                token_ids=[] if ids else None))
                elif msg.text or fin or msg.token_ids:
                    yield _sse(P.chunk_body(kind, rid, created, model, i, msg.text, fin, include_usage=inc,
                                            token_ids=list(msg.token_ids) if ids else None))
                if fin:
                    usages[i] = msg.usage
            if inc:
                yield _sse(P.usage_chunk(kind, rid, created, model, _usage(usages)))
        except RpcError as e:
            err = P.from_rpc(e.code, e.details, renames=renames)
            self.on_error(e.code)
            yield _sse(err.body())
        except asyncio.CancelledError:
            self.on_error("CANCELLED")
            raise
        finally:
            for s in streams:
                with contextlib.suppress(Exception):
                    await s.aclose()
        yield _DONE


def _grpc_code_of(status: int) -> str:
    for code, (st, _) in P.HTTP_STATUS.items():
        if st == status:
            return code
    return "INTERNAL" if status >= 500 else "INVALID_ARGUMENT"


def _usage(usages: list) -> dict:
    us = [u for u in usages if u is not None]
    if not us:
        return P.usage_dict(0, 0, 0)
    # the choices share the prompt: count it once (OpenAI does the same)
    return P.usage_dict(us[0].prompt_tokens, sum(u.completion_tokens for u in us), us[0].cached_tokens)


async def _gather_cancelling(coros: list) -> list:
    """gather, but the first failure (or our own cancellation) cancels the others."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        await _cancel_all(tasks)


async def _cancel_all(tasks: list) -> None:
    """Cancel the tasks that are still running and wait until every one has ended."""
    for t in tasks:
        if not t.done():
            t.cancel()
    for t in tasks:
        with contextlib.suppress(BaseException):
            await t


async def _first_of_all(streams: list) -> list:
    """The first message of every choice's stream (so errors surface before the response starts);
    on failure every stream is closed (which cancels its engine request).

    The choices are routed one after the other (each `__anext__` up to the accepted marker), then
    wait for their first tokens together: Serve gives the engine calls made while handling one
    HTTP request the parent's internal_request_id, and its router keys pending requests by that
    id (request_router.py `_add_pending_request_to_indices`), so sibling requests routed at the
    same time collide and never get a replica (found with n=2: both waited out the timeout)."""
    try:
        for s in streams:
            if await s.__anext__() is not None:  # the accepted marker (yield_accepted=True)
                raise RpcError("INTERNAL", "engine stream started without the accepted marker")
        if len(streams) == 1:
            return [await streams[0].__anext__()]
        return await asyncio.gather(*(s.__anext__() for s in streams))
    except BaseException:
        for s in streams:
            with contextlib.suppress(BaseException):
                await s.aclose()
        raise


async def _collect(stream, first) -> tuple[str, str | None, object, list[int]]:
    text, fin, usage = [first.text], first.finish_reason or None, first.usage if first.finish_reason else None
    ids = list(first.token_ids)
    if fin is None:
        async for msg in stream:
            text.append(msg.text)
            ids.extend(msg.token_ids)
            if msg.finish_reason:
                fin, usage = msg.finish_reason, msg.usage
    return "".join(text), fin, usage, ids


async def _merged(streams: list, firsts: list) -> AsyncIterator[tuple[int, object]]:
    """(choice index, GenerateResponse) from every stream as they arrive, starting with `firsts`."""
    if len(streams) == 1:
        yield 0, firsts[0]
        if not firsts[0].finish_reason:
            async for msg in streams[0]:
                yield 0, msg
        return
    q: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i, s, first):
        try:
            q.put_nowait((i, first))
            if not first.finish_reason:
                async for msg in s:
                    q.put_nowait((i, msg))
            q.put_nowait((i, end))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, s, f)) for i, (s, f) in enumerate(zip(streams, firsts))]
    live = len(tasks)
    try:
        while live:
            i, item = await q.get()
            if item is end:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        await _cancel_all(tasks)
