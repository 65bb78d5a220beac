"""AsyncLLMEngine: the engine behind an asyncio API, for the serving layer.

The LLMEngine runs in ONE background thread (torch releases the GIL inside its ops, so the event
loop stays responsive during a step). Callers never touch the engine directly: `generate` validates
the request synchronously (bad input raises at once, in the caller), then hands it to the engine
thread through a command queue. After each step the engine thread hands that step's outputs to the
caller's event loop in ONE `loop.call_soon_threadsafe` (not one per request: each call writes the
loop's self-pipe and wakes it), which appends each to its request's `OutputStream` (a deque plus
one waiter future: no asyncio.Queue). Closing or cancelling the async iterator enqueues an abort,
which frees the request's KV blocks before the next step.

Coalescing (`generate(..., coalesce=True)`, what the serving worker uses): each item carries every
output delivered since the previous item (`merge_outputs`: token ids and text concatenated, the
cumulative fields and finish_reason of the newest), so a consumer that falls behind gets fewer,
larger items instead of a backlog, and never waits for an output that had already arrived.

Admission (`admit_gap_s`): when an idle engine receives a request, it keeps collecting requests
that follow within `admit_gap_s` of each other (at most `admit_max_s` in all) before its first
step. Without it, concurrent requests that land a few microseconds apart (the first add wakes the
engine thread before the other callers have run) start with a step for the first request alone,
and the rest prefill one step later: measured with bench/serving_hops.py (default model, 8 streams,
AMD EPYC 2 cores), 2 of 3 in-process waves and 3 of 3 served waves began with a 1-request step
(33 steps instead of 32, ~100-150 ms more per wave, random per wave). It waits only at the
idle -> busy edge, never while requests are running (a new request then joins the next step as
before), so a request that arrives alone at an idle engine waits about `admit_gap_s` (at most
`admit_max_s`) longer for its first token.

One owner: session get/delete/list, ingest progress and the drain run on the engine thread too
(`_call`: a command carrying a function and an asyncio future), so they never race with the
`on_add`/`on_finish` bookkeeping of a step.

Faults: an exception in a step (the model forward) fails only the requests scheduled in that step
(their KV blocks are freed by the abort) and the engine serves on; `UNHEALTHY_AFTER` consecutive
failing steps make `stats()` raise, which Serve's check_health turns into a replica replacement.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator

from .engine import EngineArgs, EngineStats, LLMEngine
from .errors import EngineDrainingError, EngineStepError, QueueFullError
from .loader import Checkpoint
from .outputs import RequestOutput, merge_outputs
from .sampling import SamplingParams


class OutputStream:
    """One request's items (outputs, or an exception that ends it) on the consumer's event loop.
    `push` runs on that loop; `next` waits until something is there and takes one item, or, with
    `coalesce`, every output there up to the first final one or exception, merged into one item."""

    __slots__ = ("loop", "items", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: deque = deque()
        self.waiter: asyncio.Future | None = None

    def push(self, item) -> None:
        self.items.append(item)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def next(self, coalesce: bool = False):
        """The next item; raises the exception item (after every output pushed before it)."""
        items = self.items
        while not items:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        item = items.popleft()
        if isinstance(item, BaseException):
            raise item
        if coalesce and items and item.finish_reason is None:
            parts = [item]
            while items and not isinstance(items[0], BaseException) and parts[-1].finish_reason is None:
                parts.append(items.popleft())
            item = merge_outputs(parts)
        return item


def _push_all(batch: list) -> None:
    for stream, item in batch:
        stream.push(item)


UNHEALTHY_AFTER = 3  # consecutive failing steps before the engine reports itself unhealthy
ADMIT_GAP_S = 0.002  # admission window of an idle engine: requests following within this of each other ...
ADMIT_MAX_S = 0.02  # ... up to this in all, start in the same first step (module doc)


class AsyncLLMEngine:
    def __init__(self, model: str | Checkpoint = "default", *, max_waiting: int = 256,
                 engine: LLMEngine | None = None, admit_gap_s: float = ADMIT_GAP_S, admit_max_s: float = ADMIT_MAX_S,
                 **engine_args):
        """`engine_args` are EngineArgs fields; `max_waiting` bounds requests not yet running;
        `admit_gap_s` / `admit_max_s`: the admission window of an idle engine (module doc; 0 turns it off)."""
        assert max_waiting >= 1, "max_waiting must be >= 1"
        assert admit_gap_s >= 0 and admit_max_s >= 0, "admit_gap_s and admit_max_s must be >= 0"
        self.admit_gap_s, self.admit_max_s = float(admit_gap_s), float(admit_max_s)
        self.engine = engine if engine is not None else LLMEngine(model, EngineArgs(**engine_args))
        self.max_waiting = max_waiting
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, OutputStream] = {}
        self._lock = threading.Lock()  # guards _streams and _pending
        self._pending = 0  # adds enqueued but not yet seen by the engine thread
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._closing = False  # set at the start of shutdown(): new work is refused from then on
        self.errors = 0
        self.consecutive_errors = 0

    # ------------------------------------------------------------------------------------ public API
    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, session_id: str | None = None, coalesce: bool = False
                       ) -> AsyncIterator[RequestOutput]:
        """Async iterator of RequestOutput (one per generated token; the last has finish_reason).
        `coalesce`: each item merges every output that arrived since the previous one (see module doc)."""
        request_id = request_id if request_id is not None else f"async-{next(self._ids)}"
        self._refuse_if_closing()
        with self._lock:
            if request_id in self._streams:
                from .errors import InvalidRequestError
                raise InvalidRequestError("request_id", f"request {request_id!r} is already running")
            if len(self.engine.scheduler.waiting) + self._pending >= self.max_waiting:
                raise QueueFullError(f"{self.max_waiting} requests are already waiting; retry later "
                                     "(or raise max_waiting)")
            req = self.engine.prepare_request(request_id, prompt, params, session_id)  # raises on bad input
            stream = OutputStream(asyncio.get_running_loop())
            self._streams[request_id] = stream
            self._pending += 1
        self._cmds.put(("add", req))
        self._ensure_thread()
        self._wake.set()
        finished = False
        try:
            while True:
                try:
                    item = await stream.next(coalesce)
                except Exception:
                    finished = True  # the engine ended the request (failed step, rejected add)
                    raise
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:  # closed or cancelled by the consumer
                self._cmds.put(("abort", request_id))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with finish_reason "abort"."""
        self._cmds.put(("abort", request_id))
        self._wake.set()

    # ------------------------------------------------------------------------------------ sessions (KV memory)
    async def ingest(self, session_id: str, prompt: str | list[int], poll_s: float = 0.25
                     ) -> AsyncIterator[dict]:
        """Append a document to a session without generating. Yields progress dicts
        {"tokens_done", "tokens_total", "done"}; the last one has done=True and the session's info."""
        self._refuse_if_closing()
        mgr = self.engine._sessions()
        rid = await self._call(mgr.new_ingest_id, session_id)
        gen = self.generate(prompt, mgr.ingest_params(), rid, session_id)
        task = asyncio.ensure_future(_drain_async(gen))
        try:
            while not task.done():
                await asyncio.wait([task], timeout=poll_s)
                p = await self._call(mgr.ingest_progress, rid)
                if not task.done() and p["tokens_done"] is not None:
                    yield p
            out = task.result()
            info = await self._call(self.engine.get_session, session_id)
            yield {"tokens_done": info["num_computed_tokens"], "tokens_total": info["num_computed_tokens"],
                   "done": True, "finish_reason": out.finish_reason if out else None, "session": info}
        finally:
            if not task.done():
                task.cancel()
                await gen.aclose()

    async def get_session(self, session_id: str) -> dict:
        return await self._call(self.engine.get_session, session_id)

    async def delete_session(self, session_id: str) -> None:
        await self._call(self.engine.delete_session, session_id)

    async def list_sessions(self) -> list[dict]:
        return await self._call(self.engine.list_sessions)

    async def resident_sessions(self) -> list[str]:
        return await self._call(self.engine.resident_sessions)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def _call(self, fn, *args):
        """Run `fn(*args)` on the engine thread between steps; its result or exception comes back here.
        After shutdown there is no engine thread to run it: EngineDrainingError at once (not a hang)."""
        self._refuse_if_closing()
        fut = asyncio.get_running_loop().create_future()
        self._cmds.put(("call", (fn, args, fut)))
        self._ensure_thread()
        self._wake.set()
        return await fut

    def _refuse_if_closing(self) -> None:
        if self._closing:
            raise EngineDrainingError()

    def stats(self) -> EngineStats:
        """Engine stats; raises RuntimeError if the engine thread died or its steps keep failing (the
        server's health check), EngineDrainingError once shutdown() began (the health probe then reads
        NOT_SERVING instead of SERVING a replica that would hang every new request)."""
        self._refuse_if_closing()
        if self._thread is not None and not self._thread.is_alive() and not self._stopped:
            raise RuntimeError("the engine loop thread is not running")
        if self.consecutive_errors >= UNHEALTHY_AFTER:
            raise RuntimeError(f"the last {self.consecutive_errors} engine steps failed (model forward); "
                               "replace this replica")
        st = self.engine.stats()
        st.num_waiting += self._pending
        return st

    def model_info(self) -> dict:
        return self.engine.model_info()

    def value_stores(self) -> dict:
        """The model's value tables by tensor name (memory-layer models; {} for a dense model)."""
        return self.engine.model.value_stores()

    def replace_value_store(self, name: str, store) -> None:
        """Serve table `name` from `store` (e.g. deploy's remote memory shards). Call before the first
        request: the engine thread reads the stores on every step."""
        self.engine.model.replace_value_store(name, store)

    def shutdown(self) -> None:
        """Stop the engine thread. Before it stops, running requests are aborted (their sessions keep
        what was computed) and every session not yet in the snapshot store is written: a drain.
        Idempotent (Serve's replica teardown and a test may both call it)."""
        if self._stopped:
            return
        self._closing = True
        done = threading.Event()
        self._cmds.put(("drain", done))
        self._ensure_thread()
        self._wake.set()
        done.wait(timeout=30)
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------------------------ engine thread
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="memserve-engine", daemon=True)
            self._thread.start()

    def _drain(self) -> int:
        """Run every queued command; returns how many requests were added."""
        added = 0
        while True:
            try:
                cmd, arg = self._cmds.get_nowait()
            except queue.Empty:
                return added
            if cmd == "add":
                added += 1
                with self._lock:
                    self._pending -= 1
                    alive = arg.request_id in self._streams
                if not alive:  # cancelled before it ever reached the engine
                    continue
                try:
                    self.engine.add_prepared(arg)
                except Exception as e:  # noqa: BLE001 - delivered to the caller
                    self._deliver(arg.request_id, e)
            elif cmd == "abort":
                out = self.engine.abort_request(arg)
                if out is not None:
                    self._deliver(arg, out)
            elif cmd == "call":
                fn, args, fut = arg
                try:
                    res, exc = fn(*args), None
                except Exception as e:  # noqa: BLE001 - delivered to the caller
                    res, exc = None, e
                _resolve(fut, res, exc)
            elif cmd == "drain":
                for rid in list(self.engine.requests):
                    out = self.engine.abort_request(rid)
                    if out is not None:
                        self._deliver(rid, out)
                try:
                    self.engine.flush_sessions()
                finally:
                    arg.set()

    def _deliver(self, request_id: str, item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, pairs: list) -> None:
        """Hand (request_id, item) pairs to their streams: one wake-up of each consumer loop."""
        by_loop: dict = {}
        with self._lock:
            for rid, item in pairs:
                stream = self._streams.get(rid)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_push_all, batch)
            except RuntimeError:  # the caller's loop is closed: nobody listens any more
                pass

    def _admit(self) -> None:
        """An idle engine just got a request: take the requests that follow within admit_gap_s of
        each other (at most admit_max_s in all) before the first step (module doc)."""
        deadline = time.monotonic() + self.admit_max_s
        while not self._stopped:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.clear()
            if self._cmds.empty() and not self._wake.wait(min(self.admit_gap_s, left)):
                return  # nothing within the gap
            # a wake without an add (the first caller's own wake-up arriving after its add was drained, an
            # abort, a session call, all handled by _drain) keeps waiting, within admit_max_s
            self._drain()

    def _loop(self) -> None:
        while not self._stopped:
            idle = not self.engine.has_unfinished()
            if self._drain() and idle and self.admit_gap_s > 0:
                self._admit()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - fail this step's requests only, keep serving
                self.errors += 1
                self.consecutive_errors += 1
                failed = [rid for rid in self.engine.last_step_ids if rid in self.engine.requests]
                errors = []
                for rid in failed or list(self.engine.requests):  # failed outside the forward: all of them
                    self.engine.abort_request(rid)  # frees its KV blocks
                    err = EngineStepError(f"engine step failed: {type(e).__name__}: {e}")
                    err.__cause__ = e  # deploy/worker.py reads a DependencyUnavailableError's name from it
                    errors.append((rid, err))
                self._deliver_all(errors)
                continue
            self.consecutive_errors = 0
            if outputs:
                self._deliver_all([(out.request_id, out) for out in outputs])


def _resolve(fut: asyncio.Future, res, exc) -> None:
    def set_():
        if fut.done():  # the caller was cancelled meanwhile
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(res)

    try:
        fut.get_loop().call_soon_threadsafe(set_)
    except RuntimeError:  # the caller's loop is closed
        pass


async def _drain_async(gen):
    last = None
    async for out in gen:
        last = out
    return last
