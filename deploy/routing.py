"""Ray Serve `RequestRouter` that applies scheduler/router.py's policy to the engine deployment.

Serve calls `choose_replicas` for each pending request from the ingress's handle. The ingress
passes `routing={"session_id", "tokens"}` as a keyword argument of every engine call; the policy
answers with preference tiers (session holder only; else the power-of-two-choices pick, then the
rest by load). Outstanding tokens are counted when a request is routed and released in
`on_request_completed` (Serve fires it exactly once per dispatched request). Session placement is
also learnt from the replicas' `record_routing_stats()` (their live session ids), so affinity
survives an ingress restart and works with several ingress replicas.
"""

from __future__ import annotations

import pickle
from typing import Optional

from memserve.scheduler.router import Router, estimate_tokens
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def _routing_of(pending_request: Optional[PendingRequest]) -> dict:
    """{"session_id", "tokens"} of a request: the ingress passes it as a keyword argument; in the
    "direct" topology the caller is Serve's gRPC proxy, whose only argument is the pickled
    gRPCRequest wrapping the client's protobuf message (read here; ~10 us for a small request)."""
    if pending_request is None:
        return {}
    routing = pending_request.kwargs.get("routing")
    if routing is not None:
        return routing
    if pending_request.args and isinstance(pending_request.args[0], bytes):
        try:
            proto = pickle.loads(pending_request.args[0]).user_request_proto
        except Exception:  # noqa: BLE001 - not a gRPC request: route by load only
            return {}
        session_id = getattr(proto, "session_id", "") or None
        tokens = 0
        if hasattr(proto, "sampling"):
            prompt_len = len(proto.prompt_token_ids) or (len(proto.prompt) + sum(len(m.content) for m in proto.messages)) // 4
            tokens = estimate_tokens(prompt_len, proto.sampling.max_tokens if proto.sampling.HasField("max_tokens") else 16)
        return {"session_id": session_id, "tokens": tokens}
    return {}


def _holds(session_id: str, sessions) -> bool:
    """Replicas list internal ids "tenant:id" (deploy/auth.py). The ingress routes by internal id;
    in the "direct" topology the router sees the client's id (the tenant is only known after the
    replica authenticated the call), so it matches the id part: two tenants' equal ids then share
    an affinity hint, never a session."""
    return session_id in sessions or any(s.partition(":")[2] == session_id for s in sessions)


class MemServeRequestRouter(RequestRouter):
    def initialize_state(self, seed: int | None = None, **kwargs):
        self._policy = Router(seed=seed)

    def _policy_or_init(self) -> Router:
        if not hasattr(self, "_policy"):
            self._policy = Router()
        return self._policy

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> list[list[RunningReplica]]:
        policy = self._policy_or_init()
        if not candidate_replicas:
            return []
        routing = _routing_of(pending_request)
        session_id = routing.get("session_id")
        by_id = {r.replica_id: r for r in candidate_replicas}
        if session_id and policy.session_replica(session_id) not in by_id:
            for r in candidate_replicas:
                if _holds(session_id, (r.routing_stats or {}).get("sessions") or ()):
                    policy.bind_session(session_id, r.replica_id)
                    break
        tiers = policy.rank(list(by_id), session_id=session_id)
        if pending_request is not None:
            policy.on_routed(pending_request.metadata.internal_request_id, tiers[0][0],
                             int(routing.get("tokens", 0)), session_id=session_id)
        return [[by_id[x] for x in tier] for tier in tiers]

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        self._policy_or_init().on_completed(internal_request_id)

    def on_replica_actor_died(self, replica_id):
        super().on_replica_actor_died(replica_id)
        self._policy_or_init().remove_replica(replica_id)

    def update_replicas(self, replicas: list[RunningReplica]):
        live = {r.replica_id for r in replicas}
        policy = self._policy_or_init()
        for rid in list(getattr(self, "_replica_id_set", set()) or set()):
            if rid not in live:
                policy.remove_replica(rid)
        return super().update_replicas(replicas)
