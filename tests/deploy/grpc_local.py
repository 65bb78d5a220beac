"""A real grpc.aio server on loopback that serves MemServeIngress's gRPC methods (memserve.v1.MemServe
and grpc.health.v1.Health) without Ray, for tests that need a real channel: real deadlines, real
client cancels, real metadata and message-size limits.

It stands where Serve's gRPC proxy stands and ends RPCs the way the proxy does: the code the
ingress set with `grpc_context.set_code` (deploy/app.py `_fail`) and its details, INTERNAL for any
exception without one (ray/serve/_private/grpc_util.py); a cancelled handler (client cancel or
deadline) is simply cancelled, as grpc.aio cancels the proxy's handler.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2_grpc
from memserve.deploy import memserve_pb2_grpc as pbg
from memserve.deploy.app import MemServeIngress
from memserve.deploy.health import Health
from memserve.deploy.ingress import IngressCore
from proto_fuzz import SERVICES


class _Ctx:
    """What the ingress uses of Serve's RayServegRPCContext, over grpc.aio's ServicerContext."""

    def __init__(self, ctx: grpc.aio.ServicerContext):
        self._ctx, self.code, self.details = ctx, None, ""

    def invocation_metadata(self):
        return self._ctx.invocation_metadata()

    def peer(self):
        return self._ctx.peer()

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


async def _abort(ctx: grpc.aio.ServicerContext, c: _Ctx, e: Exception):
    await ctx.abort(c.code or grpc.StatusCode.INTERNAL, c.details or f"{type(e).__name__}: {e}")


def _unary(fn):
    async def handler(request, context):
        c = _Ctx(context)
        try:
            return await fn(request, grpc_context=c)
        except Exception as e:  # noqa: BLE001 - what the proxy would send
            await _abort(context, c, e)

    return handler


def _stream(fn):
    async def handler(request, context):
        c = _Ctx(context)
        try:
            async for msg in fn(request, grpc_context=c):
                yield msg
        except Exception as e:  # noqa: BLE001
            await _abort(context, c, e)

    return handler


class _Servicer:
    def __init__(self, ing: MemServeIngress):
        for svc in SERVICES:
            for m in svc.methods:
                fn = getattr(ing, m.name)
                setattr(self, m.name, _stream(fn) if m.server_streaming else _unary(fn))


def make_ingress(client, *, health_probe=None, **core_kwargs) -> MemServeIngress:
    """MemServeIngress's gRPC methods over `client` (serving_testlib.LocalClient), no Serve handle."""
    ing = MemServeIngress.__new__(MemServeIngress)
    ing.core = IngressCore(client, **core_kwargs)
    ing.metrics = None
    ing.health = Health(health_probe or (lambda: ing.core.client.call("model_info")), None, cache_s=0.0,
                        watch_period_s=0.01)
    return ing


async def start_server(ing: MemServeIngress, max_receive_bytes: int | None = None) -> tuple[grpc.aio.Server, str]:
    """Start on the running loop; returns (server, "127.0.0.1:port"). Stop with `await server.stop(0)`."""
    opts = [("grpc.max_receive_message_length", max_receive_bytes)] if max_receive_bytes else []
    server = grpc.aio.server(options=opts)
    servicer = _Servicer(ing)
    pbg.add_MemServeServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def outcome(rpc, streaming: bool, cancel_after_s: float | None = None) -> str:
    """How a client call ended: "OK", "CANCELLED" (the client cancelled it after cancel_after_s),
    or "<status code name> <details>"."""

    async def consume():
        if streaming:
            async for _ in rpc:
                pass
        else:
            await rpc

    try:
        if cancel_after_s is not None:
            task = asyncio.ensure_future(consume())
            await asyncio.wait([task], timeout=cancel_after_s)
            rpc.cancel()
            await task
        else:
            await consume()
        return "OK"
    except asyncio.CancelledError:
        return "CANCELLED"
    except grpc.aio.AioRpcError as e:
        return f"{e.code().name} {e.details()}"
