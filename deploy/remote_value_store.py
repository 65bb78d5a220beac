"""The engine's side of memory shards (issue 17): a ValueStore whose rows live in MemoryShard deployments.

`submit(indices, weights)` sends the step's lookups of one memory layer to all P shards at once, one
message per shard (indices int32 when the table has < 2**31 slots, weights fp32), and returns a
future; `.result()` waits for the assembled answer (columns: concatenated in column order; rows:
partial bags added in shard order, see deploy/memory_shards.py for what that means for exactness).
The model calls `submit` before the work that does not depend on the rows (the dense MLP in
"parallel" mode) and `.result()` after, so the network time overlaps it.

One call loop. Every store of the process sends through one asyncio loop on its own thread
(`CallLoop`), and the shard handles' routers run on that loop: `submit` hands the whole layer-step to
the loop in one thread hop, one coroutine there fans out the P calls, retries, assembles, and wakes
the engine thread once. Against Serve's default for a handle used from a thread without a loop
(router on Serve's router thread: `.remote()` and `.result()` each cross threads, per shard message),
measured by bench/memory_shard_hops.py on 2 shared cores: the engine thread's time to send a
layer-step drops from 0.7-1.0 ms per shard message to 0.02-0.04 ms (that time cannot overlap
anything); the round trip itself moves within the load's noise at P = 1 and at P = 3 (an earlier,
exploratory window measured P = 3 9.3-12.0 -> 7.1-8.6 ms, bench's window at load 13 12.2-12.5 ->
12.8-14.5 ms): a Serve message's cost is mostly CPU in Serve's request path on both sides.

Faults. A shard replica that dies mid-lookup makes its call fail (actor died / unavailable) or hang;
the lookup is re-sent to the same deployment (Serve routes it to another replica, or to the
replacement once it is up) until `retry_timeout_s` has passed since the first try. Lookups are pure
reads, so a retry is always safe and returns the same rows: generation continues with identical
output. After the bound, `.result()` raises MemoryShardUnavailableError naming the shard; the engine
fails the step's requests and deploy/worker.py maps the error to gRPC UNAVAILABLE. A missing answer
never becomes a zero row.

Ray stays out of runtime/: this module only needs objects with `.lookup.remote(i, w)` returning an
awaitable (a Serve DeploymentHandle's response) or something with `.result(timeout_s=...)` (fakes in
tests), so the engine sees a plain ValueStore.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import threading
import time

import numpy as np
import torch
from memserve.runtime.errors import DependencyUnavailableError
from memserve.runtime.memory_layers import ValueStore

log = logging.getLogger("memserve.deploy")
_INT32_MAX = 2**31 - 1


class MemoryShardUnavailableError(DependencyUnavailableError):
    """A memory shard did not answer within the retry bound (gRPC UNAVAILABLE naming the shard: the
    worker maps the runtime base class, raw or as the cause of the engine's EngineStepError)."""

    def __init__(self, shard: str, waited_s: float, cause: BaseException | None):
        self.shard = shard
        super().__init__(shard, f"memory shard {shard} unavailable: no answer within {waited_s:.1f} s "
                         f"(last error: {type(cause).__name__ if cause else 'timeout'}: {cause}); "
                         f"check `serve status` for deployment {shard}")


def _retryable() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [TimeoutError, ConnectionError]
    try:
        from ray import exceptions as rx

        errs += [rx.RayActorError, rx.ActorUnavailableError, rx.GetTimeoutError]
        from ray.serve.exceptions import DeploymentUnavailableError

        errs.append(DeploymentUnavailableError)
    except ImportError:  # pragma: no cover - used without Ray (fakes in tests)
        pass
    return tuple(errs)


class CallLoop:
    """The process's one asyncio loop for shard calls, on a daemon thread (started at first use)."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="memserve-shard-calls", daemon=True).start()
                cls._loop = loop
            return cls._loop

    @classmethod
    def run(cls, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, cls.get())


def on_call_loop(handle):
    """A Serve DeploymentHandle whose router runs on the CallLoop (so a shard call and its answer never
    cross threads inside this process); anything else (test fakes) unchanged. A handle is initialized
    once, at its first call or `_init` (private in Ray 2.60; the public options() cannot choose the
    loop): an uninitialized one is initialized here, an initialized one is replaced by a fresh handle
    to the same deployment."""
    if not (hasattr(handle, "_init") and hasattr(handle, "deployment_name")):
        return handle
    if handle.is_initialized:
        handle = type(handle)(handle.deployment_name, handle.app_name)

    async def init():
        handle._init(_run_router_in_separate_loop=False)  # the router takes the running loop: ours
        return handle

    return CallLoop.run(init()).result(timeout=60)


class RemoteLookup:
    """The pending lookup of one layer-step on P shards; `.result()` -> (T, dim) fp32 rows."""

    __slots__ = ("store", "fut", "_out")

    def __init__(self, store: RemoteValueStore, idx: np.ndarray, w: np.ndarray):
        self.store, self._out = store, None
        self.fut = CallLoop.run(store._lookup(idx, w))  # all P leave from the loop; one thread hop here

    def done(self) -> bool:
        return self._out is not None or self.fut.done()

    def result(self) -> torch.Tensor:
        if self._out is None:
            st = self.store
            try:  # the loop enforces the retry bound; this wait only guards against a stuck loop
                self._out = self.fut.result(timeout=st.retry_timeout_s + st.call_timeout_s + 5.0)
            except concurrent.futures.TimeoutError:
                self.fut.cancel()
                raise MemoryShardUnavailableError(",".join(st.names), st.retry_timeout_s, None) from None
        return self._out


class RemoteValueStore(ValueStore):
    """A value table cut into P shards behind Serve deployment handles (one per shard, shard order).

    Shared by every engine replica: each holds handles to the same deployments. `metrics`, when
    given, is a deploy.metrics.ServingMetrics (lookup latency and bytes per shard)."""

    def __init__(self, table: str, handles: list, names: list[str], layout: str, num_rows: int, dim: int,
                 *, dtype: str = "float32", table_bytes: int = 0, retry_timeout_s: float = 30.0,
                 call_timeout_s: float = 10.0, backoff_s: float = 0.2, metrics=None):
        if layout not in ("columns", "rows"):
            raise ValueError(f"shard layout {layout!r}: expected 'columns' or 'rows'")
        if len(handles) != len(names) or not handles:
            raise ValueError("RemoteValueStore needs one handle per shard name (and at least one)")
        self.table, self.names, self.layout = table, list(names), layout
        self.handles = [on_call_loop(h) for h in handles]
        self.num_rows, self.dim, self._dtype, self._nbytes = num_rows, dim, dtype, table_bytes
        self.num_shards = len(handles)
        self.retry_timeout_s, self.call_timeout_s, self.backoff_s = retry_timeout_s, call_timeout_s, backoff_s
        self.metrics = metrics
        self.retryable = _retryable()
        self.index_dtype = np.int32 if num_rows <= _INT32_MAX else np.int64
        self.lookups = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.retries = 0
        self.replicas: dict[str, int] = {}  # running replicas per shard, filled by deploy/memory_shard_app.py

    @classmethod
    def from_specs(cls, specs: list, handles: list, **kw) -> RemoteValueStore:
        s0 = specs[0]
        itemsize = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1}.get(s0.dtype, 4)
        dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8"}.get(s0.dtype, s0.dtype)
        scales = s0.rows * 4 if s0.dtype == "I8" else 0  # int8: + per-row fp32 scales
        return cls(s0.table, handles, [s.name for s in specs], s0.layout, s0.rows, s0.dim, dtype=dtype,
                   table_bytes=s0.rows * s0.dim * itemsize + scales, **kw)

    # ---- ValueStore -----------------------------------------------------------------------------
    def submit(self, indices: torch.Tensor, weights: torch.Tensor) -> RemoteLookup:
        idx = np.ascontiguousarray(indices.detach().cpu().numpy(), dtype=self.index_dtype)
        w = np.ascontiguousarray(weights.detach().cpu().numpy(), dtype=np.float32)
        if idx.shape != w.shape or idx.ndim != 2:
            raise ValueError(f"lookup: indices {idx.shape} and weights {w.shape} must both be (T, K)")
        self.lookups += 1
        self.bytes_sent += self.num_shards * (idx.nbytes + w.nbytes)
        return RemoteLookup(self, idx, w)

    def lookup(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.submit(indices, weights).result()

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def dtype(self) -> str:
        return self._dtype

    def shard_info(self) -> list[dict]:
        """One entry per shard (GetModelInfo's MemoryShardInfo fields)."""
        from memserve.deploy.memory_shards import split

        n = self.num_rows if self.layout == "rows" else self.dim
        return [{"name": name, "layout": self.layout, "begin": b, "end": e, "table": self.table,
                 "replicas": self.replicas.get(name, 0)}
                for name, (b, e) in zip(self.names, split(n, self.num_shards), strict=True)]

    # ---- internals --------------------------------------------------------------------------------
    async def _lookup(self, idx: np.ndarray, w: np.ndarray) -> torch.Tensor:
        t0 = time.monotonic()
        parts = await asyncio.gather(*[self._call(s, idx, w, t0) for s in range(self.num_shards)])
        return self._assemble(parts)

    async def _call(self, s: int, idx: np.ndarray, w: np.ndarray, t0: float) -> np.ndarray:
        """One shard's answer, re-sent on a retryable failure until retry_timeout_s after t0."""
        deadline = t0 + self.retry_timeout_s
        last, tries = None, 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(s)
                raise MemoryShardUnavailableError(self.names[s], self.retry_timeout_s, last)
            try:
                resp = self.handles[s].lookup.remote(idx, w)
                timeout = min(left, self.call_timeout_s)
                if inspect.isawaitable(resp):
                    out = await asyncio.wait_for(resp, timeout)
                else:  # a handle-shaped fake: .result(timeout_s=) off the loop
                    out = await asyncio.get_running_loop().run_in_executor(None, lambda r=resp, t=timeout: r.result(timeout_s=t))
                self._observe(s, time.monotonic() - t0, idx.nbytes + w.nbytes + out.nbytes)
                return out
            except self.retryable as e:  # asyncio's wait_for raises the builtin TimeoutError (3.11+)
                last, tries = e, tries + 1
                self.retries += 1
                self.bytes_sent += idx.nbytes + w.nbytes  # re-sent
                log.warning("memory shard %s lookup failed (%s: %s); retry %d", self.names[s], type(e).__name__, e, tries)
                await asyncio.sleep(min(self.backoff_s * tries, max(0.0, deadline - time.monotonic())))

    def _assemble(self, parts: list[np.ndarray]) -> torch.Tensor:
        if self.layout == "columns":
            # one part: Ray's zero-copy result is read-only; torch must get memory it may write (copy only then)
            return torch.from_numpy(np.concatenate(parts, axis=1) if len(parts) > 1
                                    else np.require(parts[0], requirements="W"))
        out = np.array(parts[0], dtype=np.float32, copy=True)
        for p in parts[1:]:  # shard order, fixed: the same inputs always give the same bits
            out += p
        return torch.from_numpy(out)

    def _observe(self, s: int, seconds: float, nbytes: int) -> None:
        self.bytes_received += nbytes
        m = self.metrics
        if m is not None:
            m.shard_lookup_seconds.labels(self.names[s]).observe(seconds)
            m.shard_bytes.labels(self.names[s]).inc(nbytes)

    def _fail(self, s: int) -> None:
        m = self.metrics
        if m is not None:
            m.shard_failures.labels(self.names[s]).inc()
