"""The standard gRPC health service (grpc.health.v1.Health: Check, Watch, List) answered by the ingress.

Serve's gRPC proxy serves only the servicers named in `grpc_servicer_functions` and routes each
method to the application's ingress deployment by its name (`/grpc.health.v1.Health/Check` ->
`MemServeIngress.Check`; with one application the `application` metadata is not needed, so
Kubernetes' grpc probe and load balancers work unchanged). deploy/app.py registers
`grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server` beside memserve's servicer; the
servicer object Serve passes is a mock, the methods below are what answers.

Status, for service "" (the server) and "memserve.v1.MemServe":
- NOT_SERVING while the application drains (Serve reports it DELETING / failed / unhealthy), while
  no engine replica is RUNNING, when the owner marks this ingress `draining`, or when the engine
  probe fails: the probe is the engine worker's `model_info`, which calls the typed engine
  protocol's health signal `ServingEngine.stats()` (runtime/engine_protocol.py: it raises when the
  engine is unhealthy, i.e. its loop died or its last steps failed), so an unhealthy engine, no
  answer within `probe_timeout_s`, or no replica at all is NOT_SERVING with the engine's reason;
- SERVING otherwise. Any other service name: NOT_FOUND (Check) / SERVICE_UNKNOWN (Watch), as the
  protocol asks.
Health RPCs need no API key (probes carry none); they reveal nothing but these states.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable

from grpc_health.v1 import health_pb2

SERVICES = ("", "memserve.v1.MemServe")
SERVICER_FN = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Health:
    """`probe()` -> answers when an engine replica is healthy, raises / times out when not (the
    worker's model_info: ServingEngine.stats() raises for an unhealthy engine);
    `app_state()` -> None when serving, else why not (from Serve's status; None outside Serve)."""

    def __init__(self, probe: Callable[[], Awaitable[dict]], app_state: Callable[[], Awaitable[str | None]] | None = None,
                 *, probe_timeout_s: float = 3.0, cache_s: float = 0.5, watch_period_s: float = 1.0):
        self.probe = probe
        self.app_state = app_state
        self.probe_timeout_s, self.cache_s, self.watch_period_s = probe_timeout_s, cache_s, watch_period_s
        self.draining = False  # set by the owner when it knows it is going away
        self._cached: tuple[float, int, str] | None = None
        # One probe in flight at a time (concurrent Check/Watch calls share it). No asyncio.Lock:
        # a lock binds to the first loop it is contended on and then raises RuntimeError on any
        # other loop, which Serve's proxy sends as INTERNAL (found by tests/deploy/test_fuzz.py
        # when it ran one event loop per batch). The in-flight task is per loop instead.
        self._inflight: asyncio.Task | None = None

    async def status(self) -> tuple[int, str]:
        """(SERVING | NOT_SERVING, why) with a short cache so probes do not load the engines."""
        if self._cached is not None and time.monotonic() - self._cached[0] < self.cache_s:
            return self._cached[1], self._cached[2]
        loop = asyncio.get_running_loop()
        task = self._inflight
        if task is None or task.done() or task.get_loop() is not loop:
            # an empty context: in a Serve replica the caller's context holds its request, and Serve
            # cancels a request's child handle calls with it, so a probe started by a Watch whose
            # deadline passed was cancelled under every other caller waiting on it (they ended
            # CANCELLED in the replica, INTERNAL with empty details at Serve's proxy: 3 of 10,000
            # fuzz calls through real Serve, tests/deploy/test_e2e.py)
            task = self._inflight = loop.create_task(self._refresh(), context=contextvars.Context())
        # shield: a caller that leaves (a Watch's deadline, a cancelled probe) does not cancel the
        # probe the other callers wait for
        return await asyncio.shield(task)

    async def _refresh(self) -> tuple[int, str]:
        st, why = await self._compute()
        self._cached = (time.monotonic(), st, why)
        return st, why

    async def _compute(self) -> tuple[int, str]:
        if self.draining:
            return NOT_SERVING, "draining"
        if self.app_state is not None:
            with contextlib.suppress(Exception):
                why = await asyncio.wait_for(self.app_state(), self.probe_timeout_s)
                if why:
                    return NOT_SERVING, why
        try:
            await asyncio.wait_for(self.probe(), self.probe_timeout_s)
        except Exception as e:  # noqa: BLE001 - any failure to answer is "not serving"
            return NOT_SERVING, f"engine probe failed: {type(e).__name__}: {e}"[:200]
        return SERVING, "ok"

    async def check(self, request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        from memserve.deploy.ingress import RpcError

        if request.service not in SERVICES:
            raise RpcError("NOT_FOUND", f"service: unknown service {request.service!r}; known: "
                           + ", ".join(repr(s) for s in SERVICES))
        st, _ = await self.status()
        return health_pb2.HealthCheckResponse(status=st)

    async def list(self, request) -> "health_pb2.HealthListResponse":
        st, _ = await self.status()
        out = health_pb2.HealthListResponse()
        for name in SERVICES:
            out.statuses[name].status = st
        return out

    async def watch(self, request: health_pb2.HealthCheckRequest):
        """The current status at once, then every change (polled each watch_period_s)."""
        if request.service not in SERVICES:
            yield health_pb2.HealthCheckResponse(status=SERVICE_UNKNOWN)
            while True:  # the protocol keeps the stream open (the service may appear later)
                await asyncio.sleep(3600)
        last = None
        while True:
            st, _ = await self.status()
            if st != last:
                yield health_pb2.HealthCheckResponse(status=st)
                last = st
            await asyncio.sleep(self.watch_period_s)


def serve_app_state(app_name: str, engine_deployment: str) -> Callable[[], Awaitable[str | None]]:
    """Serve's view of the application: why it is not serving, or None."""

    async def state() -> str | None:
        from ray import serve

        st = await asyncio.to_thread(serve.status)
        app = st.applications.get(app_name)
        if app is None:
            return f"application {app_name!r} not deployed"
        s = str(getattr(app.status, "value", app.status))
        if s in ("DELETING", "DEPLOY_FAILED", "UNHEALTHY"):
            return f"application {s.lower()}"
        dep = app.deployments.get(engine_deployment)
        if dep is not None and int(dep.replica_states.get("RUNNING", 0)) == 0:
            return "no engine replica running"
        return None

    return state
