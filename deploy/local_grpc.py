"""memserve.v1.MemServe (and grpc.health.v1.Health) on a plain grpc.aio server, without Ray.

    engine (in this process) -> EngineWorker -> IngressCore -> grpc.aio server (plaintext)

The same IngressCore that Serve's ingress deployment runs (validation, API keys, tenants, limits,
status codes) answers here, with one process and no Ray hop. Used where Ray Serve is not the point:
the TLS-termination test (an nginx in front, tests/deploy/test_tls.py) and the soak benchmark
(bench/soak.py), which needs one process whose RSS means the whole server's.

Status codes: an RpcError from the core ends the call with `context.abort(code, details)`. A client
cancel or deadline cancels the handler task; the CancelledError lands inside IngressCore's
generator, which cancels the engine stream (the request is aborted, its KV blocks freed) exactly
as on Serve.

Behind a TLS-terminating proxy on the same host every caller's peer is the proxy's loopback
address, so the "no API keys -> loopback clients only" guard no longer tells clients apart:
configure API keys there (deploy/README.md, "TLS").
"""

from __future__ import annotations

import grpc
from memserve.deploy import memserve_pb2_grpc as pb_grpc
from memserve.deploy.auth import metadata_value
from memserve.deploy.ingress import IngressCore, RpcError


async def _abort(context, e: RpcError):
    await context.abort(getattr(grpc.StatusCode, e.code), e.details)


class LocalServicer(pb_grpc.MemServeServicer):
    def __init__(self, core: IngressCore):
        self.core = core

    async def _tenant(self, context) -> str:
        try:
            return self.core.authenticate(metadata_value(context.invocation_metadata()), context.peer())
        except RpcError as e:
            await _abort(context, e)

    async def _stream(self, method, request, context):
        tenant = await self._tenant(context)
        try:
            async for msg in method(request, tenant=tenant):
                yield msg
        except RpcError as e:
            await _abort(context, e)

    async def _unary(self, method, request, context):
        tenant = await self._tenant(context)
        try:
            return await method(request, tenant=tenant)
        except RpcError as e:
            await _abort(context, e)

    # async generator functions themselves: grpc.aio tells streaming handlers by inspect.isasyncgenfunction
    async def Generate(self, request, context):
        async for msg in self._stream(self.core.generate, request, context):
            yield msg

    async def Ingest(self, request, context):
        async for msg in self._stream(self.core.ingest, request, context):
            yield msg

    async def GetSession(self, request, context):
        return await self._unary(self.core.get_session, request, context)

    async def DeleteSession(self, request, context):
        return await self._unary(self.core.delete_session, request, context)

    async def GetModelInfo(self, request, context):
        return await self._unary(self.core.get_model_info, request, context)


class _HealthServicer:
    def __init__(self, health):
        self.health = health

    async def Check(self, request, context):
        try:
            return await self.health.check(request)
        except RpcError as e:
            await _abort(context, e)

    async def List(self, request, context):
        return await self.health.list(request)

    async def Watch(self, request, context):
        async for msg in self.health.watch(request):
            yield msg


async def start_server(core: IngressCore, *, host: str = "127.0.0.1", port: int = 0,
                       max_message_bytes: int | None = None) -> tuple[grpc.aio.Server, int]:
    """Start a plaintext server on host:port (0 = a free port) in the running event loop; returns
    (server, bound port). Stop it with `await server.stop(grace)`."""
    from grpc_health.v1 import health_pb2_grpc
    from memserve.deploy.health import Health

    n = max_message_bytes or core.limits.max_request_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", n), ("grpc.max_send_message_length", n)])
    pb_grpc.add_MemServeServicer_to_server(LocalServicer(core), server)
    health = Health(lambda: core.client.call("model_info"))
    health_pb2_grpc.add_HealthServicer_to_server(_HealthServicer(health), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"could not bind gRPC port {host}:{port}")
    await server.start()
    return server, bound

