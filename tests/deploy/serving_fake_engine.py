"""A small test double of the contract's AsyncLLMEngine (Ray Serve LLM's habit: test the serving
layer without a model, in addition to — never instead of — the real end-to-end tests).

Deterministic: token i of a request is (sum(prompt ids) + 7 * i) % vocab; text is "<id>". It keeps a
block pool (one block per 4 tokens) so cancellation leaks are visible, a bounded waiting queue
(QueueFullError), and optional sessions. It implements runtime/engine_protocol.ServingEngine, checked by
tests/runtime/test_engine_protocol.py together with the real AsyncLLMEngine (the same test module
runs against both, so the double cannot drift from the engine).

One deliberate difference, off in that conformance test: by default (open_unknown_sessions=False) a
Generate on a session the double does not hold is NOT_FOUND instead of opening it, so the serving
tests see a request routed to the wrong replica. `fail_steps(n)` makes the next n token steps raise,
as a failing model forward does in AsyncLLMEngine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from memserve.runtime.async_engine import OutputStream
from memserve.runtime.errors import (
    EngineDrainingError,
    EngineStepError,
    InvalidRequestError,
    QueueFullError,
    SessionNotFoundError,
    SessionsUnsupportedError,
)


@dataclass(slots=True)
class FakeSampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list = field(default_factory=list)
    stop_token_ids: list = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if not 1 <= self.max_tokens <= 4096:
            raise InvalidRequestError("max_tokens", f"must be in [1, 4096], got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequestError("temperature", f"must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be >= 0 (0 = off), got {self.top_k}")


@dataclass(slots=True)
class FakeOutput:
    request_id: str
    prompt_token_ids: list
    token_ids: list
    text: str
    new_token_ids: list
    new_text: str
    finish_reason: str | None
    num_cached_tokens: int = 0
    metrics: object = None


@dataclass(slots=True)
class FakeStats:
    num_running: int
    num_waiting: int
    kv_cache_usage_perc: float
    num_free_blocks: int
    num_total_blocks: int
    kv_memory_bytes: dict
    sessions_active: int
    blocks_retrieved_total: int
    memory_lookups_total: int = 0  # the double has no memory layers
    memory_lookup_seconds_total: float = 0.0
    memory_lookup_layers: dict = field(default_factory=dict)


class FakeTokenizer:
    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + ("<|assistant|>" if add_generation_prompt else "")

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 100 for c in text]


class FakeAsyncEngine:
    tokenizer = FakeTokenizer()

    def __init__(self, model="fake", *, max_waiting=4, max_running=2, num_blocks=64, step_s=0.002,
                 vocab_size=100, sessions=True, open_unknown_sessions=False, **_):
        self.max_waiting, self.max_running = max_waiting, max_running
        self.num_total_blocks = self.free_blocks = num_blocks
        self.step_s, self.vocab_size = step_s, vocab_size
        self.running: set[str] = set()
        self.waiting: list[str] = []
        self.aborted: list[str] = []
        self.blocks_retrieved_total = 0
        self._sessions: dict[str, int] | None = {} if sessions else None
        self.open_unknown_sessions = open_unknown_sessions
        self._busy: set[str] = set()  # sessions with a running request
        self._abort: set[str] = set()  # request ids asked to stop (their stream ends with "abort")
        self._fail = 0  # token steps still to fail (fail_steps)
        self.consecutive_errors = 0
        self.drained = False  # shutdown() was called: new work and stats() raise EngineDrainingError

    def _refuse_if_drained(self):
        if self.drained:
            raise EngineDrainingError("this replica is draining (test double shut down); send new requests "
                                      "to another replica")

    def _need_sessions(self):
        if self._sessions is None:
            raise SessionsUnsupportedError("this engine (test double, sessions=False) has no sessions")
        return self._sessions

    def _ids(self, prompt):
        return list(prompt) if isinstance(prompt, list) else [ord(c) % self.vocab_size for c in prompt]

    def fail_steps(self, n: int) -> None:
        self._fail = n

    def _check_prompt(self, prompt, request_id):
        if request_id in self.running or request_id in self.waiting:
            raise InvalidRequestError("request_id", f"request {request_id!r} is already running")
        if isinstance(prompt, list):
            bad = [t for t in prompt if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
            if bad:
                raise InvalidRequestError("prompt", f"token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        elif not isinstance(prompt, str):
            raise InvalidRequestError("prompt", f"must be a string or a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise InvalidRequestError("prompt", "is empty")

    async def generate(self, prompt, params, request_id, session_id=None, coalesce=False):
        """Like the real engine, tokens are produced by a task of their own whether or not the consumer
        keeps up (a slow consumer with coalesce=True gets merged items)."""
        stream = OutputStream(asyncio.get_running_loop())

        async def produce():
            try:
                async for out in self._produce(prompt, params, request_id, session_id):
                    stream.push(out)
            except Exception as e:  # noqa: BLE001 - ends the stream, as the real engine's failures do
                stream.push(e)

        task = asyncio.ensure_future(produce())
        finished = False
        try:
            while not finished:
                try:
                    item = await stream.next(coalesce)
                except Exception:
                    finished = True
                    raise
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:  # closed or cancelled by the consumer: stop producing, free the blocks
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _produce(self, prompt, params, request_id, session_id):
        self._refuse_if_drained()
        self._check_prompt(prompt, request_id)
        cached = 0
        if session_id is not None:
            sessions = self._need_sessions()
            if session_id not in sessions and not self.open_unknown_sessions:
                raise SessionNotFoundError(session_id)
            if session_id in self._busy:
                raise InvalidRequestError("session_id", f"session {session_id!r} already has a running request")
            cached = sessions.get(session_id, 0)
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"waiting queue full ({self.max_waiting})")
        ids = self._ids(prompt)
        if session_id is not None:
            self._busy.add(session_id)
            self._sessions[session_id] = cached
        metrics = SimpleNamespace(arrival_time=time.monotonic(), first_scheduled_time=None)  # as RequestOutput.metrics
        self.waiting.append(request_id)
        blocks = 0
        try:
            while len(self.running) >= self.max_running and request_id not in self._abort:
                await asyncio.sleep(self.step_s)
            self.waiting.remove(request_id)
            self.running.add(request_id)
            metrics.first_scheduled_time = time.monotonic()
            blocks = -(-len(ids) // 4)  # the prompt's blocks, taken at admission like a prefill
            self.free_blocks -= blocks
            out_ids, text = [], ""
            for i in range(params.max_tokens):
                await asyncio.sleep(self.step_s)
                if request_id in self._abort:
                    yield FakeOutput(request_id, ids, list(out_ids), text, [], "", "abort", cached, metrics)
                    return
                if self._fail > 0:
                    self._fail -= 1
                    self.consecutive_errors += 1
                    raise EngineStepError("engine step failed: injected (test double)")
                self.consecutive_errors = 0
                if (len(ids) + i) % 4 == 0:
                    self.free_blocks -= 1
                    blocks += 1
                tok = (sum(ids) + 7 * i) % self.vocab_size
                out_ids.append(tok)
                piece = f"<{tok}>"
                text += piece
                fin = "length" if i == params.max_tokens - 1 else None
                if session_id is not None:
                    self.blocks_retrieved_total += 1  # a session's decode step reads its KV memory
                    self._sessions[session_id] = cached + len(ids) + len(out_ids)  # the session grows
                yield FakeOutput(request_id, ids, list(out_ids), text, [tok], piece, fin, cached, metrics)
        finally:
            self._abort.discard(request_id)
            self._busy.discard(session_id)
            if request_id in self.waiting:
                self.waiting.remove(request_id)
            if request_id in self.running:
                self.running.discard(request_id)
            self.free_blocks += blocks

    async def abort(self, request_id):
        self.aborted.append(request_id)
        if request_id in self.running or request_id in self.waiting:
            self._abort.add(request_id)

    def stats(self):
        self._refuse_if_drained()
        if self.consecutive_errors >= 3:  # AsyncLLMEngine's UNHEALTHY_AFTER
            raise RuntimeError(f"the last {self.consecutive_errors} engine steps failed (test double)")
        used = self.num_total_blocks - self.free_blocks
        return FakeStats(len(self.running), len(self.waiting), used / self.num_total_blocks, self.free_blocks,
                         self.num_total_blocks, {"device": used * 1024, "memory": 4096 * len(self._sessions or {})}, len(self._sessions or {}), self.blocks_retrieved_total)

    def model_info(self):
        return {"name": "fake", "architecture": "FakeForCausalLM", "vocab_size": self.vocab_size,
                "max_model_len": 2048, "block_size": 4}

    async def ingest(self, session_id, prompt):
        self._refuse_if_drained()
        start = self._need_sessions().get(session_id, 0)  # a document is appended to the session
        n = start + len(self._ids(prompt))
        for done in range(start, n, 8):
            await asyncio.sleep(0)
            yield {"tokens_done": done, "tokens_total": n}
        self._sessions[session_id] = n
        yield {"tokens_done": n, "tokens_total": n, "done": True}

    async def get_session(self, session_id):
        if session_id not in self._need_sessions():
            raise SessionNotFoundError(session_id)
        return {"session_id": session_id, "num_tokens": self._sessions[session_id],
                "bytes": {"device": 0, "memory": 4096}, "busy": session_id in self._busy}

    async def delete_session(self, session_id):
        if session_id not in self._need_sessions():
            raise SessionNotFoundError(session_id)
        del self._sessions[session_id]

    async def list_sessions(self):
        return [await self.get_session(s) for s in self._need_sessions()]

    async def resident_sessions(self):
        return list(self._sessions or ())

    def shutdown(self):
        # the drain: what runs ends with finish_reason "abort" (no store: sessions stay in RAM)
        self._abort.update(self.running, self.waiting)
        self.drained = True
