"""Engine-replica side of the serving plane, free of Ray: wraps an `AsyncLLMEngine` (the contract's
async interface) and turns its outputs into small dicts for the ingress.

Wire format (what crosses the Ray hop, plain dicts so no class has to be importable on both sides):
    {"accepted": replica}                                     first item of every stream
    {"text": str, "token_ids": [...], "finish_reason": str|None, "usage": {...}|None}
    {"error": {"code": "RESOURCE_EXHAUSTED"|..., "message": str}}   then the stream ends

Coalescing: the engine stream is read with `coalesce=True`, so each message carries every token
that arrived since the previous message. When the consumer (Ray hop + gRPC proxy) keeps up, every
token is its own message; when it falls behind, chunks grow instead of the backlog, so
per-message overhead cannot cap throughput.
"""

from __future__ import annotations

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
        self._layer_buckets_seen: dict = {}  # layer -> the per-bucket (reads, seconds) last replayed

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
        recorder = None
        if self.metrics is not None:
            from memserve.deploy.metrics import RequestRecorder

            recorder = RequestRecorder(self.metrics, self.model_name, arrival, api=req.get("api", "grpc"))
        # coalesce=True: each output carries every token that arrived since the previous one, so a
        # consumer that falls behind (Ray hop + gRPC proxy) gets fewer, larger messages, and none
        # waits on a token that was already there. No pump task and no second queue here: the
        # engine stream is the only buffer between the engine thread and the wire.
        agen = self.engine.generate(prompt, params, req["request_id"], session_id=req.get("session_id") or None,
                                    coalesce=True)
        finished = False
        try:
            async for out in agen:
                ids, fin = out.new_token_ids or [], out.finish_reason
                if not (ids or out.new_text or fin is not None):
                    continue
                if recorder is not None:
                    recorder.on_tokens(len(ids))
                msg = {"text": out.new_text or "", "token_ids": ids, "finish_reason": fin, "usage": None}
                if fin is not None:
                    finished = True
                    msg["usage"] = _usage(out)
                    if recorder is not None:
                        recorder.finish(fin, len(out.prompt_token_ids or []), _queue_time(out))
                    yield msg
                    return
                yield msg
            finished = True
        except Exception as e:  # noqa: BLE001 - mapped below
            finished = True
            mapped = error_of(e)
            if mapped is None:
                raise
            yield mapped
        except BaseException as e:
            log.debug("generate %s ended by %r", req["request_id"], e)
            raise
        finally:
            # closing the engine iterator aborts the request (contract); abort is idempotent, and
            # covers an iterator that never started
            with contextlib.suppress(Exception):
                await agen.aclose()
            if not finished:
                with contextlib.suppress(Exception):
                    await self.engine.abort(req["request_id"])

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
        self._replay_read_histograms(stats.memory_lookup_layers)

    def _replay_read_histograms(self, layers: dict) -> None:
        """memserve:memory_lookup_read_seconds{layer} from the engine's cumulative per-layer buckets
        ([(reads, seconds)] per bucket): a bucket that gained d reads totalling s seconds is observed d times
        at s / d. The mean of reads that all fell in one bucket lies in that bucket, so bucket counts, _count
        and _sum come out exactly as if each read had been observed (public prometheus_client API only)."""
        hist = self.metrics.memory_lookup_read_seconds
        for layer, buckets in layers.items():
            child = hist.labels(self.model_name, str(layer))
            seen = self._layer_buckets_seen.setdefault(layer, [(0, 0.0)] * len(buckets))
            for (n, secs), (n0, s0) in zip(buckets, seen):
                for _ in range(n - n0):
                    child.observe(max(0.0, secs - s0) / (n - n0))
            self._layer_buckets_seen[layer] = list(buckets)


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
