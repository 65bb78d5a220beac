"""A small test double of the contract's AsyncLLMEngine (Ray Serve LLM's habit: test the serving
layer without a model, in addition to — never instead of — the real end-to-end tests).

Deterministic: token i of a request is (sum(prompt ids) + 7 * i) % vocab; text is "<id>". It keeps a
block pool (one block per 4 tokens) so cancellation leaks are visible, a bounded waiting queue
(QueueFullError), and optional sessions. It implements runtime/engine_protocol.ServingEngine, checked by
tests/runtime/test_engine_protocol.py together with the real AsyncLLMEngine.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from memserve.runtime.errors import (
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


class FakeTokenizer:
    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + ("<|assistant|>" if add_generation_prompt else "")

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 100 for c in text]


class FakeAsyncEngine:
    tokenizer = FakeTokenizer()

    def __init__(self, model="fake", *, max_waiting=4, max_running=2, num_blocks=64, step_s=0.002,
                 vocab_size=100, sessions=True, **_):
        self.max_waiting, self.max_running = max_waiting, max_running
        self.num_total_blocks = self.free_blocks = num_blocks
        self.step_s, self.vocab_size = step_s, vocab_size
        self.running: set[str] = set()
        self.waiting: list[str] = []
        self.aborted: list[str] = []
        self.blocks_retrieved_total = 0
        self._sessions: dict[str, int] | None = {} if sessions else None

    def _need_sessions(self):
        if self._sessions is None:
            raise SessionsUnsupportedError("this engine (test double, sessions=False) has no sessions")
        return self._sessions

    def _ids(self, prompt):
        return list(prompt) if isinstance(prompt, list) else [ord(c) % self.vocab_size for c in prompt]

    async def generate(self, prompt, params, request_id, session_id=None):
        if session_id is not None and self._sessions is not None and session_id not in self._sessions:
            raise SessionNotFoundError(session_id)
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"waiting queue full ({self.max_waiting})")
        ids = self._ids(prompt)
        metrics = SimpleNamespace(arrival_time=time.monotonic(), first_scheduled_time=None)  # as RequestOutput.metrics
        self.waiting.append(request_id)
        blocks = 0
        try:
            while len(self.running) >= self.max_running:
                await asyncio.sleep(self.step_s)
            self.waiting.remove(request_id)
            self.running.add(request_id)
            metrics.first_scheduled_time = time.monotonic()
            out_ids, text = [], ""
            for i in range(params.max_tokens):
                await asyncio.sleep(self.step_s)
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
                yield FakeOutput(request_id, ids, list(out_ids), text, [tok], piece, fin, metrics=metrics)
        finally:
            if request_id in self.waiting:
                self.waiting.remove(request_id)
            if request_id in self.running:
                self.running.discard(request_id)
            self.free_blocks += blocks

    async def abort(self, request_id):
        self.aborted.append(request_id)

    def stats(self):
        used = self.num_total_blocks - self.free_blocks
        return FakeStats(len(self.running), len(self.waiting), used / self.num_total_blocks, self.free_blocks,
                         self.num_total_blocks, {"device": used * 1024, "memory": 4096 * len(self._sessions or {})}, len(self._sessions or {}), self.blocks_retrieved_total)

    def model_info(self):
        return {"name": "fake", "architecture": "FakeForCausalLM", "vocab_size": self.vocab_size,
                "max_model_len": 2048, "block_size": 4}

    async def ingest(self, session_id, data):
        self._need_sessions()
        n = len(self._ids(data))
        for done in range(0, n, 8):
            await asyncio.sleep(0)
            yield {"tokens_done": done, "tokens_total": n}
        self._sessions[session_id] = n
        yield {"tokens_done": n, "tokens_total": n, "done": True}

    async def get_session(self, session_id):
        if session_id not in self._need_sessions():
            raise SessionNotFoundError(session_id)
        return {"session_id": session_id, "num_tokens": self._sessions[session_id], "memory_bytes": 4096,
                "bytes": 4096, "state": "active"}

    async def delete_session(self, session_id):
        if session_id not in self._need_sessions():
            raise SessionNotFoundError(session_id)
        del self._sessions[session_id]

    async def list_sessions(self):
        return [await self.get_session(s) for s in self._need_sessions()]

    async def resident_sessions(self):
        return list(self._need_sessions())

    def shutdown(self):
        pass
