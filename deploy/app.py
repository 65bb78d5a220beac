"""The Ray Serve application: a gRPC ingress deployment and an engine deployment.

    client --gRPC--> Serve gRPC proxy (:9000) --> MemServeIngress (validate, map status codes)
                                                   | handle + MemServeRequestRouter
                                                   v   (session affinity -> p2c by outstanding tokens)
                                                  MemServeEngine replicas (AsyncLLMEngine each)

Status codes with Serve's gRPC proxy: a deployment method takes `grpc_context:
RayServegRPCContext`; to fail an RPC it calls `set_code` / `set_details` and raises. The replica
wraps the exception in `gRPCStatusError` carrying that code, and the proxy puts the code and
details on the wire (ray/serve/_private/replica.py `_maybe_wrap_grpc_exception`,
_private/grpc_util.py `get_grpc_response_status`). Without `set_code`, any exception becomes
INTERNAL.

Cancellation and deadlines: when a client cancels or its deadline passes, grpc.aio cancels the
proxy's handler; the proxy cancels the ingress request, whose generator cancels the engine
stream it holds (`DeploymentResponseGenerator.cancel`), and the engine worker closes the engine's
iterator, which aborts the request and frees its KV blocks. `gRPCOptions.request_timeout_s` adds
a server-side bound.

Topology "direct" (AppConfig.topology) drops the ingress tier: MemServeDirect replicas are engine
and gRPC ingress at once, and Serve's proxy routes to them with the same MemServeRequestRouter
(which then reads session id and size from the request's protobuf). Each streamed token crosses
one Ray hop instead of two; measured with a tiny model on 2 CPUs at 8 streams: 445 vs 325 tokens/s
through the serving path (bench/serving.py).

Memory shards (issue 17, AppConfig.memory_shards = P > 0): P MemoryShard deployments per value
table sit beside MemServeEngine in the same application; the engine deployment receives their
handles as constructor arguments (the way the ingress receives the engine's), so every engine
replica shares one set of shards (deploy/memory_shard_app.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from memserve.deploy import memserve_pb2 as pb
from memserve.deploy.config import AppConfig
from memserve.deploy.ingress import IngressCore, RpcError
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

log = logging.getLogger("memserve.deploy")
ENGINE_DEPLOYMENT = "MemServeEngine"
INGRESS_DEPLOYMENT = "MemServeIngress"
GAUGE_PERIOD_S = 0.5


class MemServeEngine:
    """One engine replica: the engine plus its request handling and gauges."""

    def __init__(self, config: dict, shards: dict | None = None):
        cfg = AppConfig(**config)
        from memserve.deploy.metrics import get_metrics
        from memserve.deploy.worker import EngineWorker, import_attr

        engine_cls = import_attr(cfg.engine_cls)
        t0 = time.time()
        engine_args = dict(cfg.engine_args)
        if cfg.session_store:
            engine_args.setdefault("session_store", cfg.session_store)
        self.engine = engine_cls(cfg.model, max_waiting=cfg.max_waiting, **engine_args)
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (tests)
            replica = f"pid{os.getpid()}"
        metrics = get_metrics() if cfg.metrics_dir else None
        self._shard_watch = None
        if shards:  # issue 17: the value tables live in the app's MemoryShard deployments (handles resolved by Serve)
            from memserve.deploy.memory_shard_app import ShardReplicaWatch, attach_remote_stores

            stores = attach_remote_stores(self.engine, shards, metrics=metrics, retry_timeout_s=cfg.shard_retry_timeout_s)
            self._shard_watch = ShardReplicaWatch(stores, cfg.app_name, replica, metrics)
        info = self.engine.model_info() or {}
        self.worker = EngineWorker(self.engine, model_name=str(info.get("name") or cfg.model), replica=replica,
                                   metrics=metrics, sampling_cls=import_attr(cfg.sampling_cls))
        log.info("engine replica %s ready in %.1f s", replica, time.time() - t0)
        self._gauge_task = None

    def _ensure_gauge_task(self):
        if self._gauge_task is None and (self.worker.metrics is not None or self._shard_watch is not None):
            self._gauge_task = asyncio.get_running_loop().create_task(self._gauges())

    async def _gauges(self):
        while True:
            with contextlib.suppress(Exception):
                self.worker.update_gauges()
            with contextlib.suppress(Exception):
                await self._refresh_shard_replicas()
            await asyncio.sleep(GAUGE_PERIOD_S)

    async def _refresh_shard_replicas(self, max_age_s: float | None = None):
        w = self._shard_watch
        if w is not None and (w.stale() if max_age_s is None else w.stale(max_age_s)):
            w.refresh(await asyncio.to_thread(serve.status))

    async def generate(self, req: dict, routing: dict | None = None):
        self._ensure_gauge_task()
        async for item in self.worker.generate(req):
            yield item

    async def ingest(self, session_id: str, data, routing: dict | None = None):
        async for item in self.worker.ingest(session_id, data):
            yield item

    async def call_session(self, name: str, session_id: str, routing: dict | None = None) -> dict:
        return await self.worker.call_session(name, session_id)

    async def model_info(self, routing: dict | None = None) -> dict:
        self._ensure_gauge_task()
        with contextlib.suppress(Exception):  # shard replica counts at most 1 s old in GetModelInfo
            await self._refresh_shard_replicas(1.0)
        return self.worker.model_info()

    async def record_routing_stats(self) -> dict[str, Any]:
        # the sessions in this replica's RAM; those only in the snapshot store load on any replica
        return {"sessions": await self.worker.resident_sessions()}

    def check_health(self):
        self.engine.stats()  # raises if the engine loop died or its steps keep failing

    def __del__(self):
        # Serve calls this when the replica stops (scale-down, redeploy) after in-flight requests had
        # graceful_shutdown_timeout_s to finish: the drain aborts what is left (its sessions keep what
        # was computed) and snapshots every session not yet in the store.
        with contextlib.suppress(Exception):
            self.engine.shutdown()


class _ServeStream:
    def __init__(self, gen):
        self._gen = gen

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await self._gen.__anext__()
        except StopAsyncIteration:
            raise
        except Exception as e:  # noqa: BLE001
            raise _map_ray_error(e) from e

    def cancel(self):
        self._gen.cancel()


def _map_ray_error(e: BaseException) -> BaseException:
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(e, RpcError):
        return e
    if isinstance(e, BackPressureError):
        return RpcError("RESOURCE_EXHAUSTED", f"every engine replica is at capacity and the routing queue is full: {e}")
    if isinstance(e, DeploymentUnavailableError):
        return RpcError("UNAVAILABLE", f"no engine replica can take the request: {e}")
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        if isinstance(e, (ActorDiedError, ActorUnavailableError)):
            return RpcError("UNAVAILABLE", f"engine replica went away: {e}")
    except ImportError:  # pragma: no cover
        pass
    return e


class ServeEngineClient:
    """IngressCore's EngineClient over a Serve DeploymentHandle."""

    def __init__(self, handle: DeploymentHandle, app_name: str):
        # Serve's gRPC transport between the ingress and engine replicas (`_by_reference=False`), not
        # Ray actor calls: an actor call's streamed items each cross an ObjectRefGenerator, a thread
        # pool future and an asyncio future chained to it (py-spy on the ingress replica, tiny model,
        # 8 streams: 0.9 -> 0.3 ms of ingress CPU per streamed message, bench/serving.py).
        # Throughput-optimized Serve defaults new handles to it, but this handle comes from `.bind()`
        # in the driver, whose Serve may have been imported before SERVE_ENV was set. Only where
        # SERVE_ENV raised the replicas' gRPC receive limit: at gRPC's default 4 MiB a request
        # below max_request_bytes would fail between the deployments.
        by_ref = os.environ.get(GRPC_LIMIT_ENV) is None
        self.handle = handle.options(_by_reference=by_ref)
        self.app_name = app_name
        self._stream_handle = handle.options(stream=True, _by_reference=by_ref)

    def stream(self, method: str, *args, routing: dict):
        return _ServeStream(getattr(self._stream_handle, method).remote(*args, routing=routing))

    async def call(self, method: str, *args, routing: dict | None = None):
        try:
            return await getattr(self.handle, method).remote(*args, routing=routing or {})
        except Exception as e:  # noqa: BLE001
            raise _map_ray_error(e) from e

    async def num_replicas(self) -> int:
        with contextlib.suppress(Exception):
            st = await asyncio.to_thread(serve.status)
            dep = st.applications[self.app_name].deployments[ENGINE_DEPLOYMENT]
            return int(dep.replica_states.get("RUNNING", 0))
        return 0


class _LocalStream:
    def __init__(self, agen):
        self._agen = agen

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._agen.__anext__()

    def cancel(self):
        asyncio.ensure_future(self._agen.aclose())


class LocalEngineClient:
    """IngressCore's EngineClient when ingress and engine share a replica (topology "direct")."""

    def __init__(self, worker, app_name: str):
        self.worker = worker
        self.app_name = app_name

    def stream(self, method: str, *args, routing: dict):
        return _LocalStream(getattr(self.worker, method)(*args))

    async def call(self, method: str, *args, routing: dict | None = None):
        res = getattr(self.worker, method)(*args)
        return await res if asyncio.iscoroutine(res) else res

    async def num_replicas(self) -> int:
        return await ServeEngineClient.num_replicas(self)  # type: ignore[arg-type]


def _edge_kwargs(cfg: AppConfig) -> dict:
    from memserve.deploy.auth import KEYS_ENV, ApiKeys

    keys = ApiKeys.from_file(cfg.api_keys_file or os.environ.get(KEYS_ENV))
    if keys.enabled:
        log.info("API keys: %d tenant(s)", len(keys.tenants()))
    else:
        log.warning("no API keys configured: every request is tenant 'default'%s", "" if cfg.allow_remote_without_keys
                    else "; only loopback clients are answered")
    return {"unavailable_timeout_s": cfg.unavailable_timeout_s, "limits": cfg.limits, "keys": keys,
            "kv_memory": cfg.kv_memory_on(), "loopback_only": not cfg.allow_remote_without_keys}


def _caller(grpc_context) -> tuple[str | None, str | None]:
    """(authorization metadata, peer) of a gRPC call."""
    from memserve.deploy.auth import metadata_value

    if grpc_context is None:
        return None, None
    return metadata_value(grpc_context.invocation_metadata()), grpc_context.peer()


class MemServeIngress:
    """gRPC methods of memserve.v1.MemServe (Serve routes /memserve.v1.MemServe/<Method> here) and
    the OpenAI-compatible HTTP API (`__call__`: Serve's HTTP proxy routes the app's HTTP requests
    here; deploy/openai_api.py). Both share one IngressCore: routing, limits, metrics."""

    def __init__(self, engine: DeploymentHandle, config: dict):
        cfg = AppConfig(**config)
        from memserve.deploy.worker import import_attr

        sampling_cls = None
        with contextlib.suppress(ImportError, AttributeError):
            sampling_cls = import_attr(cfg.sampling_cls)
        self.core = IngressCore(ServeEngineClient(engine, cfg.app_name), sampling_cls=sampling_cls, **_edge_kwargs(cfg))
        self.metrics = None
        if cfg.metrics_dir:
            from memserve.deploy.metrics import get_metrics

            self.metrics = get_metrics()
        self._init_http(cfg)

    def _init_health(self, cfg: AppConfig) -> None:
        from memserve.deploy.health import Health, serve_app_state

        self.health = Health(lambda: self.core.client.call("model_info"), serve_app_state(cfg.app_name, ENGINE_DEPLOYMENT),
                             probe_timeout_s=min(5.0, cfg.unavailable_timeout_s))

    def _init_http(self, cfg: AppConfig) -> None:
        self._init_health(cfg)
        from memserve.deploy.openai_api import OpenAIServer

        def count(code: str) -> None:
            if self.metrics is not None:
                self.metrics.request_errors.labels(code, "http").inc()

        self.http = OpenAIServer(self.core, aliases=[cfg.model, cfg.app_name], on_error=count)

    async def __call__(self, request):
        """HTTP: the OpenAI-compatible API (POST /v1/chat/completions, /v1/completions; GET /v1/models)."""
        return await self.http(request)

    def _fail(self, e: BaseException, grpc_context) -> None:
        import grpc

        if isinstance(e, asyncio.CancelledError):
            code, details = "CANCELLED", "client cancelled or deadline passed"
        elif isinstance(e, RpcError):
            code, details = e.code, e.details
        else:
            code, details = "INTERNAL", f"{type(e).__name__}: {e}"
        if self.metrics is not None:
            self.metrics.request_errors.labels(code, "grpc").inc()
        if grpc_context is not None and not isinstance(e, asyncio.CancelledError):
            grpc_context.set_code(getattr(grpc.StatusCode, code))
            grpc_context.set_details(details)

    async def _stream(self, method, request, grpc_context):
        try:
            tenant = self.core.authenticate(*_caller(grpc_context))
            async for msg in method(request, tenant=tenant):
                yield msg
        except BaseException as e:
            self._fail(e, grpc_context)
            raise

    async def _unary(self, method, request, grpc_context):
        try:
            tenant = self.core.authenticate(*_caller(grpc_context))
            return await method(request, tenant=tenant)
        except BaseException as e:
            self._fail(e, grpc_context)
            raise

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None):
        async for msg in self._stream(self.core.generate, request, grpc_context):
            yield msg

    async def Ingest(self, request: pb.IngestRequest, grpc_context=None):
        async for msg in self._stream(self.core.ingest, request, grpc_context):
            yield msg

    async def GetSession(self, request: pb.GetSessionRequest, grpc_context=None) -> pb.SessionInfo:
        return await self._unary(self.core.get_session, request, grpc_context)

    async def DeleteSession(self, request: pb.DeleteSessionRequest, grpc_context=None) -> pb.DeleteSessionResponse:
        return await self._unary(self.core.delete_session, request, grpc_context)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, grpc_context=None) -> pb.ModelInfo:
        return await self._unary(self.core.get_model_info, request, grpc_context)

    # grpc.health.v1.Health (deploy/health.py): no API key needed, probes carry none
    async def Check(self, request, grpc_context=None):
        try:
            return await self.health.check(request)
        except BaseException as e:
            self._fail(e, grpc_context)
            raise

    async def List(self, request, grpc_context=None):
        try:
            return await self.health.list(request)
        except BaseException as e:
            self._fail(e, grpc_context)
            raise

    async def Watch(self, request, grpc_context=None):
        try:
            async for msg in self.health.watch(request):
                yield msg
        except BaseException as e:
            self._fail(e, grpc_context)
            raise


class MemServeDirect(MemServeEngine, MemServeIngress):
    """Topology "direct": one deployment is both the gRPC ingress and the engine. Serve's proxy
    routes straight to engine replicas (with the same MemServeRequestRouter, which then reads the
    session id from the request itself); one Ray hop less per streamed message."""

    def __init__(self, config: dict, shards: dict | None = None):
        MemServeEngine.__init__(self, config, shards)
        cfg = AppConfig(**config)
        self.core = IngressCore(LocalEngineClient(self.worker, cfg.app_name), sampling_cls=self.worker.sampling_cls,
                                **_edge_kwargs(cfg))
        self.metrics = self.worker.metrics
        if self.metrics is None and cfg.metrics_dir:
            from memserve.deploy.metrics import get_metrics

            self.metrics = get_metrics()
        self._init_http(cfg)

    async def __call__(self, request):
        self._ensure_gauge_task()
        return await MemServeIngress.__call__(self, request)

    async def Generate(self, request: pb.GenerateRequest, grpc_context=None):
        self._ensure_gauge_task()
        async for msg in MemServeIngress.Generate(self, request, grpc_context):
            yield msg


def build_app(config: AppConfig):
    """The bound Serve application (pass to `serve.run`)."""
    from memserve.deploy.memory_shard_app import bind_shards
    from memserve.deploy.metrics import MULTIPROC_ENV
    from memserve.deploy.routing import MemServeRequestRouter

    env = dict(config.env_vars)
    if config.metrics_dir:
        env[MULTIPROC_ENV] = config.metrics_dir
    shards = bind_shards(config, env)  # {} unless memory_shards > 0: P MemoryShard deployments per value table
    threads = str(config.engine_threads or os.cpu_count() or 1)
    engine_env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **env}
    actor_opts = {"num_cpus": config.engine_num_cpus, "num_gpus": config.engine_num_gpus,
                  "runtime_env": {"env_vars": engine_env}}
    scaling: dict[str, Any] = (
        {"autoscaling_config": config.autoscaling_config} if config.autoscaling_config is not None
        else {"num_replicas": config.num_replicas})
    engine = serve.deployment(
        MemServeDirect if config.topology == "direct" else MemServeEngine,
        name=ENGINE_DEPLOYMENT,
        ray_actor_options=actor_opts,
        max_ongoing_requests=config.resolved_max_ongoing(),
        max_queued_requests=config.max_queued_requests,
        health_check_period_s=10,
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=min(2.0, max(0.1, config.graceful_shutdown_timeout_s / 4)),
        request_router_config=RequestRouterConfig(
            request_router_class=MemServeRequestRouter,
            request_router_kwargs={"seed": config.router_seed},
            request_routing_stats_period_s=1.0,
            request_routing_stats_timeout_s=5.0,
        ),
        **scaling,
    ).bind(config.model_dump(), *([shards] if shards else []))
    if config.topology == "direct":
        return engine
    ingress_opts: dict[str, Any] = {"num_cpus": config.ingress_num_cpus}
    if env:
        ingress_opts["runtime_env"] = {"env_vars": env}
    ingress = serve.deployment(
        MemServeIngress,
        name=INGRESS_DEPLOYMENT,
        num_replicas=config.ingress_replicas,
        ray_actor_options=ingress_opts,
        max_ongoing_requests=100_000,  # the engine deployment's bounds apply; the ingress only relays
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=min(2.0, max(0.1, config.graceful_shutdown_timeout_s / 4)),
    ).bind(engine, config.model_dump())
    return ingress


def app_builder(args: dict) -> Any:
    """Import path for Serve config files: `import_path: memserve.deploy.app:app_builder`, `args:` = AppConfig."""
    return build_app(AppConfig(**(args or {})))


# Serve's throughput-optimized mode (ray/serve/_private/constants.py): user code on the replica's
# main event loop instead of a second thread, gRPC instead of Ray actor calls between handles and
# replicas, buffered access logs. These are read at import time by every Serve process (controller,
# proxy, replicas), so they go into the environment before `ray.init` starts the local cluster.
#
# RAY_worker_niceness=0: Ray's raylet starts worker processes at nice 15 (ray_config_def.h
# worker_niceness), and the engine thread plus torch's OpenMP threads inherit it. On a shared
# machine the engine then loses CPU to everything else: found with `top -H` on a replica (NI 15)
# while bench/serving.py showed the replica's per-token latency 30% above the in-process engine's
# at 1 stream.
#
# RAY_SERVE_PROXY_USE_GRPC=1: Serve's proxy reaches the ingress over Serve's gRPC transport too (the
# throughput-optimized mode switches it on for handles but not for the proxy); the replicas' gRPC
# receive limit (GRPC_LIMIT_ENV, gRPC's 4 MiB by default) goes to gRPC's maximum, since the edge
# bounds request sizes itself (max_request_bytes, the proxy's RAY_SERVE_GRPC_MAX_MESSAGE_SIZE).
# Measured with bench/serving.py (tiny model, 8 streams): proxy CPU per streamed message 0.7 -> 0.3 ms.
GRPC_LIMIT_ENV = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_worker_niceness": "0", "RAY_SERVE_PROXY_USE_GRPC": "1",
             GRPC_LIMIT_ENV: str(2**31 - 1)}


def init_ray(**kwargs):
    """`ray.init` for a local cluster with SERVE_ENV (values already set in the environment win)."""
    import ray

    for k, v in SERVE_ENV.items():
        os.environ.setdefault(k, v)
    kwargs.setdefault("include_dashboard", False)
    try:
        return ray.init(**kwargs)
    except Exception as e:
        # Ray waits a fixed 30 s for its raylet to register with the GCS; on a loaded 2-core box that
        # wait has run out ("The current node timed out during startup", seen once in a full test run
        # while other jobs ran). One more try, after a clean shutdown, before giving up.
        if "timed out during startup" not in str(e):
            raise
        log.warning("Ray's node did not start within its 30 s: %s; trying once more", e)
        ray.shutdown()
        return ray.init(**kwargs)


def serve_actor_pids(app_name: str | None = None, deployment: str | None = None) -> dict[str, int]:
    """pid of every live Serve actor, from Ray's actor table: with app_name + deployment, that
    deployment's replicas keyed by unique replica id (actor names are
    'SERVE_REPLICA::<app>#<deployment>#<unique id>'); without, the proxies keyed by actor name.
    Used to tell a restarted replica from the same one (a new unique id and pid) and to sample
    their RSS (bench/soak.py --serve)."""
    from ray._private.state import actors

    prefix = f"SERVE_REPLICA::{app_name}#{deployment}#" if deployment else "SERVE_PROXY_ACTOR"
    return {(a["Name"].rsplit("#", 1)[1] if deployment else a["Name"]): a["Pid"] for a in actors().values()
            if a["State"] == "ALIVE" and a["Name"].startswith(prefix)}


def replica_grpc_targets(app_name: str, proxy_port: int, timeout_s: float = 60.0) -> list[tuple[str, int]]:
    """(ip, port) of the gRPC server each running ingress replica of `app_name` serves itself.

    Serve's throughput-optimized mode (SERVE_ENV) turns on its "direct ingress"
    (RAY_SERVE_ENABLE_DIRECT_INGRESS defaults to 1 there): every ingress replica (MemServeIngress in
    topology `ingress`, the engine replicas in `direct`) also runs a gRPC server of its own, with
    the app's servicers, on a port the controller allocates (RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT,
    40000 up). A client there skips Serve's gRPC proxy; the controller's target groups list them for
    an external load balancer. Empty where direct ingress is off. Waits until every running
    replica is listed (the proxy's port, `proxy_port`, stands in for an app whose replicas are not up yet)."""
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    deadline = time.time() + timeout_s
    while True:
        groups = ray.get(controller.get_target_groups.remote(app_name))
        targets = [(t.ip, t.port) for g in groups if g.protocol == RequestProtocol.GRPC and g.app_name == app_name
                   for t in g.targets if t.port != proxy_port]
        if targets or time.time() > deadline:
            return targets
        time.sleep(0.5)


def grpc_options(port: int = 9000, request_timeout_s: float | None = None):
    from memserve.deploy.health import SERVICER_FN
    from ray.serve.config import gRPCOptions

    return gRPCOptions(port=port, grpc_servicer_functions=["memserve.deploy.memserve_pb2_grpc.add_MemServeServicer_to_server",
                                                           SERVICER_FN],
                       request_timeout_s=request_timeout_s)


def start(config: AppConfig, *, grpc_port: int = 9000, http_port: int = 8000, http_host: str = "127.0.0.1",
          route_prefix: str = "/", blocking_timeout_s: float = 600.0):
    """Start Serve (with the gRPC proxy) on the connected Ray cluster and deploy the app.

    HTTP: the app's OpenAI-compatible API is at http://http_host:http_port{route_prefix}v1/...
    (route_prefix "/" so that an OpenAI client's base_url is simply http://host:port/v1)."""
    from ray.serve.config import HTTPOptions

    serve.start(http_options=HTTPOptions(host=http_host, port=http_port), grpc_options=grpc_options(grpc_port))
    return serve.run(build_app(config), name=config.app_name, route_prefix=route_prefix, blocking=False)
