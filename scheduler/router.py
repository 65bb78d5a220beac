"""Which engine replica a request goes to: session affinity, else power-of-two-choices by
outstanding tokens.

Pure policy (no Ray): replicas are opaque hashable ids. `deploy/routing.py` adapts this to Ray
Serve's `RequestRouter` interface; the tests drive it directly.

- A request with a `session_id` goes to the replica that holds the session's KV memory (the
  session is bound to a replica the first time it is routed; the memory cannot follow it
  elsewhere). If that replica is gone, the session is re-bound like a new one.
- Any other request samples two replicas at random and takes the one with fewer *outstanding
  tokens* (prompt tokens + max new tokens of every request routed there and not yet finished).
  Mitzenmacher's "power of two choices" (IEEE TPDS 2001): two random samples give an
  exponentially better maximum load than one, at O(1) cost and without herding every router
  onto the same "least loaded" replica. Tokens, not request counts, because a 30k-token prompt
  and a 10-token prompt are not the same load.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Inflight:
    replica: Hashable
    tokens: int


@dataclass(slots=True)
class Router:
    """Routing state of one ingress: outstanding tokens per replica and session bindings."""

    seed: int | None = None
    _rng: random.Random = field(init=False, repr=False)
    _outstanding: dict[Hashable, int] = field(default_factory=dict, init=False)
    _inflight: dict[Hashable, _Inflight] = field(default_factory=dict, init=False)
    _sessions: dict[str, Hashable] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    # ---- policy -------------------------------------------------------------------------------
    def rank(self, replicas: Sequence[Hashable], *, session_id: str | None = None) -> list[list[Hashable]]:
        """Preference tiers: tier 0 is the choice, later tiers are fallbacks if it refuses.

        A bound session has a single tier (its memory lives on that replica: waiting for it is
        better than answering from a replica that does not know the session).
        """
        assert replicas, "rank() needs at least one replica"
        if session_id:
            holder = self._sessions.get(session_id)
            if holder is not None and holder in replicas:
                return [[holder]]
        if len(replicas) == 1:
            return [[replicas[0]]]
        a, b = self._rng.sample(list(replicas), 2)
        first = a if self.outstanding(a) <= self.outstanding(b) else b
        rest = sorted((r for r in replicas if r != first), key=self.outstanding)
        return [[first], rest]

    def choose(self, replicas: Sequence[Hashable], *, session_id: str | None = None) -> Hashable:
        return self.rank(replicas, session_id=session_id)[0][0]

    # ---- bookkeeping --------------------------------------------------------------------------
    def on_routed(self, key: Hashable, replica: Hashable, tokens: int, *, session_id: str | None = None) -> None:
        """Request `key` (e.g. Serve's internal request id) was sent to `replica`."""
        assert tokens >= 0, tokens
        self.on_completed(key)  # a retried key is re-counted, never double-counted
        self._inflight[key] = _Inflight(replica, tokens)
        self._outstanding[replica] = self._outstanding.get(replica, 0) + tokens
        if session_id:
            self._sessions[session_id] = replica

    def on_completed(self, key: Hashable) -> None:
        inflight = self._inflight.pop(key, None)
        if inflight is None:
            return
        left = self._outstanding.get(inflight.replica, 0) - inflight.tokens
        if left > 0:
            self._outstanding[inflight.replica] = left
        else:
            self._outstanding.pop(inflight.replica, None)

    def bind_session(self, session_id: str, replica: Hashable) -> None:
        self._sessions[session_id] = replica

    def unbind_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def session_replica(self, session_id: str) -> Hashable | None:
        return self._sessions.get(session_id)

    def remove_replica(self, replica: Hashable) -> None:
        """The replica died or was scaled down: forget its load and its sessions."""
        self._outstanding.pop(replica, None)
        for key in [k for k, v in self._inflight.items() if v.replica == replica]:
            del self._inflight[key]
        for sid in [s for s, r in self._sessions.items() if r == replica]:
            del self._sessions[sid]

    def outstanding(self, replica: Hashable) -> int:
        return self._outstanding.get(replica, 0)

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)


def estimate_tokens(prompt_len: int, max_tokens: int) -> int:
    """Outstanding-token cost of a request: every prompt token is computed once (prefill) and up to
    max_tokens are decoded."""
    return max(0, prompt_len) + max(0, max_tokens)
