"""Sampling parameters (validated at the edge) and the batched sampler.

Reproducibility: every request with a `seed` owns a `torch.Generator`, and its row is sampled with
that generator alone, so a seeded request draws the same tokens whatever else shares its batch
(batch composition changes between runs with continuous batching).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import InvalidRequestError

# temperatures below this are greedy (as in vLLM: dividing by ~0 overflows, argmax is the limit)
_GREEDY_EPS = 1e-5


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # KV memory per-request overrides (runtime/kv_memory_backend.py): None = engine default,
    # "off" = dense paged attention, "retrieval" = KV memory; memory_topk overrides the blocks per step
    kv_memory: str | None = None
    memory_topk: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first bad field."""
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise InvalidRequestError("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise InvalidRequestError("temperature", f"must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise InvalidRequestError("seed", f"must be an integer or None, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError("stop", f"stop strings must be non-empty strings, got {s!r}")
        if self.kv_memory not in (None, "off", "retrieval"):
            raise InvalidRequestError("kv_memory", f"must be None, 'off' or 'retrieval', got {self.kv_memory!r}")
        if self.memory_topk is not None and (not isinstance(self.memory_topk, int)
                                             or isinstance(self.memory_topk, bool) or self.memory_topk < 0):
            raise InvalidRequestError("memory_topk", f"must be an integer >= 0 or None, got {self.memory_topk!r}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise InvalidRequestError("stop_token_ids", f"must be token ids >= 0, got {t!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def make_generator(self) -> torch.Generator | None:
        """The per-request generator (None = torch's global one, for unseeded requests)."""
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(self.seed)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits (V,) -> logits with the tokens outside top-k / the top-p nucleus set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass BEFORE it already reaches top_p (the top token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """logits (N, V) fp32, one row per request -> one token id per row."""
    greedy_ids = logits.argmax(dim=-1).tolist()  # one op for the whole batch
    out = []
    for i, p in enumerate(params):
        if p.greedy:
            out.append(greedy_ids[i])
            continue
        row = logits[i] / p.temperature
        row = _filter_top_k_top_p(row, p.top_k, p.top_p)
        probs = row.softmax(-1)
        out.append(int(torch.multinomial(probs, 1, generator=generators[i])))
    return out
