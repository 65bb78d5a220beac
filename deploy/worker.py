"""Engine-replica side of the serving plane, free of Ray: wraps an `AsyncLLMEngine` (the contract's
async interface) and turns its outputs into small dicts for the ingress.

Wire format (what crosses the Ray hop, plain dicts so no class has to be importable on both sides):
    {"accepted": replica}                                     first item of every stream
    {"text": str, "token_ids": [...], "finish_reason": str|None, "usage": {...}|None}
    {"error": {"code": "RESOURCE_EXHAUSTED"|..., "message": str}}   then the stream ends

Coalescing: a pump task moves engine outputs into a queue; the stream drains everything queued
into one message. When the consumer (Ray hop + gRPC proxy) keeps up, every token is its own
message; when it falls behind, chunks grow instead of the backlog, so per-message overhead
cannot cap throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from memserve.runtime.engine_protocol import ServingEngine
from memserve.runtime.errors import (
    DataLossError,
    DependencyUnavailableError,
    EngineStepError,
    InvalidRequestError,
    QueueFullError,
    SessionNotFoundError,
    SessionsUnsupportedError,
)

log = logging.getLogger("memserve.deploy")

_DONE = object()


def error(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_of(exc: BaseException) -> dict | None:
    """Map the runtime's errors to gRPC status names (None: not a client error)."""
    if isinstance(exc, SessionsUnsupportedError):
        return error("UNIMPLEMENTED", str(exc))
    if isinstance(exc, InvalidRequestError):
        return error("INVALID_ARGUMENT", str(exc))
    if isinstance(exc, DataLossError):
        return error("DATA_LOSS", str(exc))
    cause = exc.__cause__ if isinstance(exc, EngineStepError) else exc
    if isinstance(cause, DependencyUnavailableError):
        # e.g. a memory shard that stayed down: name it (never INTERNAL, never a zero row)
        msg = str(cause) if cause.dependency in str(cause) else f"{cause.dependency} unavailable: {cause}"
        return error("UNAVAILABLE", f"{msg}; retry the request")
    if isinstance(exc, EngineStepError):
        return error("UNAVAILABLE", f"{exc}; retry the request")
    if isinstance(exc, SessionNotFoundError):
        return error("NOT_FOUND", str(exc))
    if isinstance(exc, QueueFullError):
        return error("RESOURCE_EXHAUSTED", str(exc) or "the replica's waiting queue is full; retry later")
    return None


def import_attr(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


class EngineWorker:
    """One engine replica's request handling (the Ray deployment delegates every call here)."""

    def __init__(self, engine: ServingEngine, *, model_name: str, replica: str, metrics=None, sampling_cls=None):
        self.engine = engine
        self.model_name = model_name
        self.replica = replica
        self.metrics = metrics
        if sampling_cls is None:
            from memserve.runtime.sampling import SamplingParams as sampling_cls
        self.sampling_cls = sampling_cls
        self._blocks_retrieved_seen = 0
        self._lookups_seen, self._lookup_seconds_seen = 0, 0.0

    # ---- Generate -----------------------------------------------------------------------------
    def _prompt(self, req: dict) -> str | list[int]:
        if req.get("messages"):
            tok = self.engine.tokenizer
            if tok is None:
                raise InvalidRequestError("messages", "this engine has no tokenizer / chat template; send prompt or prompt_token_ids")
            text = tok.apply_chat_template(req["messages"], add_generation_prompt=True)
            # the template already carries the special tokens (BOS, <|im_start|>): add none on top
            return tok.encode(text, add_special_tokens=False)
        if req.get("prompt_token_ids"):
            return list(req["prompt_token_ids"])
        return req["prompt"]

    async def generate(self, req: dict) -> AsyncIterator[dict]:
        yield {"accepted": self.replica}
        arrival = time.time()
        try:
            params = self.sampling_cls(**req.get("sampling", {}))
            prompt = self._prompt(req)
        except Exception as e:  # noqa: BLE001 - mapped below
            mapped = error_of(e)
            if mapped is None:
                raise
            yield mapped
            return
        queue: asyncio.Queue = asyncio.Queue()
        pump = asyncio.ensure_future(self._pump(prompt, params, req, queue))
        recorder = None
        if self.metrics is not None:
            from memserve.deploy.metrics import RequestRecorder

            recorder = RequestRecorder(self.metrics, self.model_name, arrival, api=req.get("api", "grpc"))
        last = None
        try:
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                text, ids, end = [], [], None
                for item in items:
                    if item is _DONE or isinstance(item, BaseException):
                        end = item
                        break
                    last = item
                    text.append(item.new_text or "")
                    ids.extend(item.new_token_ids or [])
                if last is not None and (ids or any(text) or last.finish_reason is not None):
                    if recorder is not None:
                        recorder.on_tokens(len(ids))
                    msg = {"text": "".join(text), "token_ids": ids, "finish_reason": last.finish_reason, "usage": None}
                    if last.finish_reason is not None:
                        msg["usage"] = _usage(last)
                        if recorder is not None:
                            recorder.finish(last.finish_reason, len(last.prompt_token_ids or []), _queue_time(last))
                    yield msg
                    if last.finish_reason is not None:
                        return
                if isinstance(end, BaseException):
                    mapped = error_of(end)
                    if mapped is None:
                        raise end
                    yield mapped
                    return
                if end is _DONE:
                    return
        except BaseException as e:
            log.debug("generate %s ended by %r", req["request_id"], e)
            raise
        finally:
            log.debug("generate %s finally pump_done=%s", req["request_id"], pump.done())
            if not pump.done():
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pump
                # belt and braces: the iterator's close already aborts (contract), abort is idempotent
                with contextlib.suppress(Exception):
                    await self.engine.abort(req["request_id"])

    async def _pump(self, prompt, params, req: dict, queue: asyncio.Queue) -> None:
        agen = self.engine.generate(prompt, params, req["request_id"], session_id=req.get("session_id") or None)
        try:
            async for out in agen:
                queue.put_nowait(out)
            queue.put_nowait(_DONE)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - forwarded to the stream
            queue.put_nowait(e)
        finally:
            with contextlib.suppress(Exception):
                await agen.aclose()

    # ---- sessions -----------------------------------------------------------------------------

    async def ingest(self, session_id: str, data: str | list[int]) -> AsyncIterator[dict]:
        yield {"accepted": self.replica}
        try:
            async for p in self.engine.ingest(session_id, data):
                yield {"progress": _progress_dict(p, session_id)}
        except Exception as e:  # noqa: BLE001
            mapped = error_of(e)
            if mapped is None:
                raise
            yield mapped

    async def call_session(self, name: str, session_id: str) -> dict:
        calls = {"get_session": self.engine.get_session, "delete_session": self.engine.delete_session}
        assert name in calls, f"not a session call: {name!r}"
        try:
            res = await calls[name](session_id)
        except Exception as e:  # noqa: BLE001
            mapped = error_of(e)
            if mapped is None:
                raise
            return mapped
        return {"result": _plain(res), "replica": self.replica}

    async def resident_sessions(self) -> list[str]:
        """Session ids in this replica's RAM (routing stats); [] when the engine has no sessions."""
        return list(await self.engine.resident_sessions())

    # ---- info / stats -------------------------------------------------------------------------
    def model_info(self) -> dict:
        info = dict(self.engine.model_info() or {})
        info["stats"] = _plain(self.engine.stats())
        with contextlib.suppress(Exception):
            import torch

            info["torch_threads"] = torch.get_num_threads()
        info["replica"] = self.replica
        return info

    def update_gauges(self) -> None:
        if self.metrics is None:
            return
        from memserve.deploy.metrics import set_engine_gauges

        stats = self.engine.stats()
        set_engine_gauges(self.metrics, self.model_name, self.replica, stats)
        total = int(stats.blocks_retrieved_total)
        counter = self.metrics.blocks_retrieved.labels(self.model_name)  # exported at 0 before any retrieval
        if total > self._blocks_retrieved_seen:
            counter.inc(total - self._blocks_retrieved_seen)
        self._blocks_retrieved_seen = max(self._blocks_retrieved_seen, total)
        # memory layers: the engine's cumulative totals, fed to the counters as deltas (exported at 0 first)
        n, secs = int(stats.memory_lookups_total), float(stats.memory_lookup_seconds_total)
        lookups = self.metrics.memory_lookups.labels(self.model_name)
        seconds = self.metrics.memory_lookup_seconds.labels(self.model_name)
        if n > self._lookups_seen:
            lookups.inc(n - self._lookups_seen)
            seconds.inc(max(0.0, secs - self._lookup_seconds_seen))
            self._lookups_seen, self._lookup_seconds_seen = n, secs


def _usage(out) -> dict:
    return {"prompt_tokens": len(out.prompt_token_ids or []), "completion_tokens": len(out.token_ids or []),
            "cached_tokens": int(out.num_cached_tokens)}


def _queue_time(out) -> float | None:
    m = out.metrics
    if m is None:
        return None
    a, s = m.arrival_time, m.first_scheduled_time
    return (s - a) if (a is not None and s is not None) else None


def _plain(obj: Any) -> Any:
    """Dataclass / object -> plain dict (picklable everywhere, no class import needed)."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    slots = getattr(type(obj), "__slots__", None)
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _plain(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if slots:
        return {k: _plain(getattr(obj, k)) for k in slots if hasattr(obj, k)}
    if hasattr(obj, "__dict__"):
        return {k: _plain(v) for k, v in vars(obj).items() if not k.startswith("_")}
    return str(obj)


def _progress_dict(p: Any, session_id: str) -> dict:
    d = _plain(p)
    if not isinstance(d, dict):
        d = {"tokens_done": int(p) if isinstance(p, (int, float)) else 0}
    return {"session_id": session_id,
            "tokens_done": int(d.get("tokens_done", d.get("done", 0)) or 0),
            "tokens_total": int(d.get("tokens_total", d.get("total", 0)) or 0),
            "done": bool(d.get("done", d.get("finished", False)))}
