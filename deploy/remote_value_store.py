"""The engine's side of memory shards (issue 17): a ValueStore whose rows live in MemoryShard deployments.

`submit(indices, weights)` sends the step's lookups of one memory layer to all P shards at once, one
message per shard (indices int32 when the table has < 2**31 slots, weights fp32), and returns a
future; `.result()` waits for the P answers and assembles them (columns: concatenated in column
order; rows: partial bags added in shard order, see deploy/memory_shards.py for what that means for
exactness). The model calls `submit` before the work that does not depend on the rows (the dense MLP
in "parallel" mode) and `.result()` after, so the network time overlaps it.

Faults. A shard replica that dies mid-lookup makes its call fail (actor died / unavailable) or hang;
the lookup is re-sent to the same deployment (Serve routes it to another replica, or to the
replacement once it is up) until `retry_timeout_s` has passed since the first try. Lookups are pure
reads, so a retry is always safe and returns the same rows: generation continues with identical
output. After the bound, `.result()` raises MemoryShardUnavailableError naming the shard; the engine
fails the step's requests and deploy/worker.py maps the error to gRPC UNAVAILABLE. A missing answer
never becomes a zero row.

Ray stays out of runtime/: this module only needs objects with `.lookup.remote(i, w)` returning
something with `.result(timeout_s=...)` (a Serve DeploymentHandle), so the engine sees a plain ValueStore.
"""

from __future__ import annotations

import logging
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


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc

    def result(self, timeout_s=None):
        raise self.exc


class RemoteLookup:
    """The pending lookup of one layer-step on P shards; `.result()` -> (T, dim) fp32 rows."""

    __slots__ = ("store", "args", "calls", "t0", "_out")

    def __init__(self, store: RemoteValueStore, idx: np.ndarray, w: np.ndarray):
        self.store, self.args, self.t0, self._out = store, (idx, w), time.monotonic(), None
        self.calls = [store._send(s, idx, w) for s in range(store.num_shards)]  # all P leave before any wait

    def done(self) -> bool:
        return self._out is not None

    def result(self) -> torch.Tensor:
        if self._out is None:
            parts = [self._wait(s) for s in range(self.store.num_shards)]
            self._out = self.store._assemble(parts)
        return self._out

    def _wait(self, s: int) -> np.ndarray:
        st = self.store
        deadline = self.t0 + st.retry_timeout_s
        call, last, tries = self.calls[s], None, 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                st._fail(s)
                raise MemoryShardUnavailableError(st.names[s], st.retry_timeout_s, last)
            try:
                out = call.result(timeout_s=min(left, st.call_timeout_s))
                st._observe(s, time.monotonic() - self.t0, self.args[0].nbytes + self.args[1].nbytes + out.nbytes)
                return out
            except st.retryable as e:
                last, tries = e, tries + 1
                st.retries += 1
                log.warning("memory shard %s lookup failed (%s: %s); retry %d", st.names[s], type(e).__name__, e, tries)
                time.sleep(min(st.backoff_s * tries, max(0.0, deadline - time.monotonic())))
                call = st._send(s, *self.args)


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
        self.table, self.handles, self.names, self.layout = table, list(handles), list(names), layout
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
    def _send(self, s: int, idx: np.ndarray, w: np.ndarray):
        self.bytes_sent += idx.nbytes + w.nbytes
        try:
            return self.handles[s].lookup.remote(idx, w)
        except self.retryable as e:  # e.g. the deployment is gone: fail on .result(), inside the retry loop
            return _Failed(e)

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
