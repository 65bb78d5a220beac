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

from memserve.deploy import limits as L
from memserve.deploy import memserve_pb2 as pb
from memserve.deploy.auth import ApiKeys, TenantBook, internal_id
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


def is_loopback(peer: str) -> bool:
    import ipaddress

    p = peer
    if p.startswith(("ipv4:", "ipv6:")):
        p = p[5:]
        p = p[1:p.index("]")] if p.startswith("[") else p.rsplit(":", 1)[0] if p.count(":") == 1 else p
    if p.startswith("unix:") or p in ("localhost", "testclient"):
        return True
    try:
        ip = ipaddress.ip_address(p)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # [::ffff:127.0.0.1] from a dual-stack socket
    return (mapped or ip).is_loopback


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
    if request.session_id:
        L.check_session_id(request.session_id)
    req["request_id"] = request.request_id or uuid.uuid4().hex
    req["session_id"] = request.session_id or None
    req["sampling"] = sampling_dict(request.sampling, sampling_cls)
    req["_est_tokens"] = estimate_tokens(prompt_len, int(req["sampling"].get("max_tokens", 16)))
    return req


class IngressCore:
    """`keys`: API keys (deploy/auth.py; none = open, tenant "default"). `limits`: deploy/limits.py.
    `kv_memory`: whether the engines run with the KV memory (then max_tokens defaults to
    limits.max_tokens_kv_memory instead of the model's context). Every public method takes the
    caller's `tenant` (from `authenticate`) and maps client session ids to `tenant:id` inside."""

    def __init__(self, client: EngineClient, *, unavailable_timeout_s: float = 30.0, sampling_cls=None,
                 limits: L.Limits | None = None, keys: ApiKeys | None = None, kv_memory: bool = True,
                 loopback_only: bool = False):
        self.client = client
        self.unavailable_timeout_s = unavailable_timeout_s
        self.sampling_cls = sampling_cls
        self.limits = limits or L.Limits()
        self.keys = keys or ApiKeys()
        self.kv_memory = kv_memory
        self.loopback_only = loopback_only
        self.book = TenantBook()
        self._vocab_size: int | None = None
        self._max_model_len: int | None = None

    def authenticate(self, authorization: str | None, peer: str | None = None) -> str:
        """The caller's tenant. `peer`: the transport's peer ("ipv4:1.2.3.4:5", "ipv6:[::1]:5",
        an HTTP client host); without keys and with `loopback_only`, only loopback peers pass."""
        if not self.keys.enabled and self.loopback_only and peer is not None and not is_loopback(peer):
            raise RpcError("UNAUTHENTICATED", f"authorization: this server has no API keys configured and answers "
                           f"loopback clients only (peer {peer}); start it with --api-keys FILE")
        return self.keys.authenticate(authorization)

    async def _vocab(self) -> int | None:
        if self._vocab_size is None:
            with contextlib.suppress(Exception):
                info = await asyncio.wait_for(self.client.call("model_info"), self.unavailable_timeout_s)
                self._vocab_size = int(info.get("vocab_size") or 0) or None
                self._max_model_len = int(info.get("max_model_len") or 0) or None
        return self._vocab_size

    async def max_tokens_cap(self) -> tuple[int, str]:
        """(cap on sampling.max_tokens, the limit's name)."""
        lim = self.limits
        if lim.max_tokens is not None:
            return lim.max_tokens, "max_tokens"
        if self.kv_memory:
            return lim.max_tokens_kv_memory, "max_tokens_kv_memory"
        await self._vocab()
        if self._max_model_len:
            return self._max_model_len, "max_tokens (default: the model's max_model_len)"
        return lim.max_tokens_kv_memory, "max_tokens_kv_memory"

    def _session_in(self, tenant: str, session_id: str, *, opens: bool) -> str:
        """Validate a client session id and return the internal one; `opens`: the request may
        create the session (quota check)."""
        L.check_session_id(session_id)
        if opens:
            self.book.check_new_session(tenant, session_id, self.limits.max_sessions_per_tenant,
                                        self.limits.max_memory_bytes_per_tenant)
        return internal_id(tenant, session_id)

    def _scrub(self, e: RpcError, tenant: str, session_id: str) -> RpcError:
        """Errors name the client's id, never the internal one; NOT_FOUND forgets the session."""
        if not session_id:
            return e
        if e.code == "NOT_FOUND":
            self.book.forget(tenant, session_id)
        return RpcError(e.code, e.details.replace(internal_id(tenant, session_id), session_id))

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

    async def generate(self, request: pb.GenerateRequest, api: str = "grpc", yield_accepted: bool = False,
                       tenant: str = L.DEFAULT_TENANT) -> AsyncIterator[pb.GenerateResponse | None]:
        """`api`: "grpc" or "http" (the OpenAI API, deploy/openai_api.py): the metrics label.
        `yield_accepted`: first yield None once a replica has accepted the request (routing done)."""
        cap, cap_name = await self.max_tokens_cap()
        L.check_generate(request, self.limits, max_tokens_cap=cap, cap_name=cap_name)
        req = validate_generate(request, vocab_size=await self._vocab() if request.prompt_token_ids else None,
                                sampling_cls=self.sampling_cls)
        sid = request.session_id
        if sid:
            req["session_id"] = self._session_in(tenant, sid, opens=True)
        client_rid = req["request_id"]
        req["request_id"] = internal_id(tenant, client_rid)
        req["api"] = api
        routing = {"session_id": req["session_id"], "tokens": req.pop("_est_tokens")}
        self.book.open_stream(tenant, self.limits.max_streams_per_tenant)
        done = False
        stream = None
        try:
            try:
                stream, _ = await self._open("generate", req, routing=routing)
            except RpcError as e:
                raise self._scrub(e, tenant, sid) from None
            if sid:
                self.book.add(tenant, sid)
            if yield_accepted:
                yield None
            async for item in stream:
                try:
                    _raise_if_error(item)
                except RpcError as e:
                    raise self._scrub(e, tenant, sid) from None
                resp = pb.GenerateResponse(request_id=client_rid, text=item["text"], token_ids=item["token_ids"])
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
            self.book.close_stream(tenant)
            if not done and stream is not None:  # client went away / deadline / error: stop the engine side now
                stream.cancel()

    async def ingest(self, request: pb.IngestRequest, tenant: str = L.DEFAULT_TENANT) -> AsyncIterator[pb.IngestProgress]:
        sid = request.session_id
        if not sid:
            raise RpcError("INVALID_ARGUMENT", f"session_id: required ({L.SESSION_ID_RULE})")
        if bool(request.text) == bool(request.token_ids):
            raise RpcError("INVALID_ARGUMENT", "text: exactly one of text, token_ids must be set")
        L.check_ingest(request, self.limits)
        internal = self._session_in(tenant, sid, opens=True)
        data = request.text or list(request.token_ids)
        n = len(request.token_ids) or max(1, len(request.text) // 4)
        self.book.open_stream(tenant, self.limits.max_streams_per_tenant)
        done = False
        stream = None
        try:
            try:
                stream, _ = await self._open("ingest", internal, data, routing={"session_id": internal, "tokens": n})
            except RpcError as e:
                raise self._scrub(e, tenant, sid) from None
            self.book.add(tenant, sid)
            async for item in stream:
                try:
                    _raise_if_error(item)
                except RpcError as e:
                    raise self._scrub(e, tenant, sid) from None
                p = item["progress"]
                yield pb.IngestProgress(session_id=sid, tokens_done=p["tokens_done"],
                                        tokens_total=p["tokens_total"], done=p["done"])
            done = True
        finally:
            self.book.close_stream(tenant)
            if not done and stream is not None:
                stream.cancel()
        if self.limits.max_memory_bytes_per_tenant is not None:  # learn the session's size for the byte quota
            with contextlib.suppress(RpcError):
                await self.get_session(pb.GetSessionRequest(session_id=sid), tenant=tenant)

    async def _session_call(self, name: str, session_id: str, tenant: str) -> dict:
        if not session_id:
            raise RpcError("INVALID_ARGUMENT", f"session_id: required ({L.SESSION_ID_RULE})")
        internal = self._session_in(tenant, session_id, opens=False)
        try:
            res = await self.client.call("call_session", name, internal, routing={"session_id": internal, "tokens": 0})
            _raise_if_error(res)
        except RpcError as e:
            raise self._scrub(e, tenant, session_id) from None
        return res

    async def get_session(self, request: pb.GetSessionRequest, tenant: str = L.DEFAULT_TENANT) -> pb.SessionInfo:
        res = await self._session_call("get_session", request.session_id, tenant)
        r = res["result"]  # ServingEngine.get_session's info (runtime/engine_protocol.py)
        nbytes = sum(int(v) for v in r["bytes"].values())  # per tier
        self.book.add(tenant, request.session_id, nbytes)
        return pb.SessionInfo(session_id=request.session_id, num_tokens=int(r["num_tokens"]), memory_bytes=nbytes,
                              state="busy" if r["busy"] else "idle", replica=str(res.get("replica", "")))

    async def delete_session(self, request: pb.DeleteSessionRequest, tenant: str = L.DEFAULT_TENANT) -> pb.DeleteSessionResponse:
        res = await self._session_call("delete_session", request.session_id, tenant)
        self.book.forget(tenant, request.session_id)
        r = res.get("result")
        return pb.DeleteSessionResponse(deleted=bool(r) if r is not None else True)

    async def get_model_info(self, request: pb.GetModelInfoRequest, tenant: str = L.DEFAULT_TENANT) -> pb.ModelInfo:
        info = await asyncio.wait_for(self.client.call("model_info"), self.unavailable_timeout_s)
        stats = info.pop("stats", {}) or {}
        known = {"name", "model", "architecture", "vocab_size", "max_model_len", "block_size", "replica",
                 "memory_layers"}
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
        mem = info.get("memory_layers")
        if isinstance(mem, dict):
            out.memory_layers.CopyFrom(memory_layers_pb(mem))
        for k, v in info.items():
            if k not in known:
                out.extra[str(k)] = str(v)
        out.extra["replica"] = str(info.get("replica", ""))
        # the answering replica's KV-memory state, so a client can check it returns to baseline
        # (bench/soak.py --serve reads these: the replica's stats are not reachable otherwise)
        out.extra["sessions_active"] = str(int(stats.get("sessions_active") or 0))
        for tier, n in (stats.get("kv_memory_bytes") or {}).items():
            out.extra[f"kv_memory_bytes.{tier}"] = str(int(n))
        return out


def memory_layers_pb(mem: dict) -> pb.MemoryLayersInfo:
    """engine model_info()["memory_layers"] -> MemoryLayersInfo."""
    shards = [pb.MemoryShardInfo(name=str(d.get("name", "")), layout=str(d.get("layout", "")),
                                 begin=int(d.get("begin") or 0), end=int(d.get("end") or 0),
                                 replicas=int(d.get("replicas") or 0)) for d in mem.get("shards") or []]
    return pb.MemoryLayersInfo(layers=[int(i) for i in mem.get("layers") or []], mode=str(mem.get("mode", "")),
                               slots=int(mem.get("slots") or 0), v_dim=int(mem.get("v_dim") or 0),
                               table_bytes=int(mem.get("table_bytes") or 0),
                               table_dtype=str(mem.get("table_dtype", "")), shards=shards)
