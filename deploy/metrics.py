"""Prometheus metrics of the serving plane: names, recording helpers, and the one endpoint.

Endpoint: `memserve serve` serves http://127.0.0.1:8080/metrics (flag `--metrics-port`); it covers
every ingress and engine replica process on the machine.

Why prometheus-client in multiprocess mode and not Ray's metrics export
--------------------------------------------------------------------------
- Names. Ray's exporter (ray.util.metrics -> the per-node metrics agent) prefixes every metric
  with `ray_` and rewrites the name, so vLLM-style `memserve:time_to_first_token_seconds` cannot be
  produced; dashboards and alert rules written for vLLM conventions would not carry over.
- One scrape target, no extra hop. Ray's agent exports on its own port, aggregates on a 5-10 s
  cadence and carries every Ray-internal series too. Here every replica process writes its
  samples into mmapped files in one shared directory (`PROMETHEUS_MULTIPROC_DIR`, set in the
  replicas' runtime_env) and the driver's HTTP server merges them at scrape time: counters and
  histograms are summed over processes (including processes that have exited, so a restarted
  replica does not make counters go backwards), gauges carry a `replica` label.
- Cost. Recording is an mmap write (~1 us); no RPC per observation.
The trade-off: the directory must be shared by the replica processes and the exporter, i.e. one
endpoint per node. On KubeRay each worker pod runs the same exporter (`python -m
memserve.deploy.metrics --dir ... --port ...`) and Prometheus scrapes every pod.

Gauges use multiprocess_mode="livesum" with a `replica` label: each series has one live writer,
and series of dead processes disappear (the exporter marks vanished pids dead on every scrape).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass

from memserve.runtime.engine_protocol import LOOKUP_SECONDS_BUCKETS

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "memserve:"

# Buckets follow vLLM's (seconds); ITL needs the millisecond range on CPU and GPU alike.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
               0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# a shard lookup is one RPC: 100 us (same host) .. seconds (retry after a replica died)
SHARD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                 2.5, 5.0, 10.0, 30.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0)


@dataclass(slots=True)
class ServingMetrics:
    """All memserve:* metrics of one process. Create once per process (`get_metrics()`)."""

    ttft: object
    itl: object
    e2e: object
    queue_time: object
    prompt_tokens: object
    generation_tokens: object
    request_success: object
    request_errors: object
    num_running: object
    num_waiting: object
    kv_cache_usage: object
    kv_free_blocks: object
    kv_memory_bytes: object
    sessions_active: object
    blocks_retrieved: object
    # memory shards (issue 17; deploy/remote_value_store.py records them, label = shard deployment name)
    shard_lookup_seconds: object
    shard_bytes: object
    shard_failures: object
    shard_replicas: object
    # memory layers (issue 16): the engine's value-table reads, all memory layers of the replica together
    memory_lookups: object
    memory_lookup_seconds: object
    memory_lookup_read_seconds: object  # per memory layer (label `layer`): one read's seconds

    @classmethod
    def create(cls, registry=None) -> "ServingMetrics":
        from prometheus_client import Counter, Gauge, Histogram

        # registry=None: in multiprocess mode the samples live in the mmapped files; the
        # exporter's MultiProcessCollector reads them, the in-process registry is not used.
        kw = {"registry": registry}
        g = {"registry": registry, "multiprocess_mode": "livesum"}
        return cls(
            ttft=Histogram(f"{PREFIX}time_to_first_token_seconds", "Time to first token (arrival to first token).",
                           ["model_name", "api"], buckets=TTFT_BUCKETS, **kw),
            itl=Histogram(f"{PREFIX}inter_token_latency_seconds", "Time between consecutive output tokens.",
                          ["model_name", "api"], buckets=ITL_BUCKETS, **kw),
            e2e=Histogram(f"{PREFIX}e2e_request_latency_seconds", "Arrival to finish of a request.",
                          ["model_name", "api"], buckets=E2E_BUCKETS, **kw),
            queue_time=Histogram(f"{PREFIX}request_queue_time_seconds", "Time a request waited before first scheduled.",
                                 ["model_name", "api"], buckets=TTFT_BUCKETS, **kw),
            prompt_tokens=Counter(f"{PREFIX}prompt_tokens", "Prompt tokens processed.", ["model_name", "api"], **kw),
            generation_tokens=Counter(f"{PREFIX}generation_tokens", "Tokens generated.", ["model_name", "api"], **kw),
            request_success=Counter(f"{PREFIX}request_success", "Finished requests by finish reason.",
                                    ["model_name", "finish_reason", "api"], **kw),
            request_errors=Counter(f"{PREFIX}request_errors", "Requests that ended with an error, by gRPC status "
                                   "name (HTTP errors are counted under the gRPC name of their status).",
                                   ["code", "api"], **kw),
            num_running=Gauge(f"{PREFIX}num_requests_running", "Requests in the running batch.",
                              ["model_name", "replica"], **g),
            num_waiting=Gauge(f"{PREFIX}num_requests_waiting", "Requests waiting to be scheduled.",
                              ["model_name", "replica"], **g),
            kv_cache_usage=Gauge(f"{PREFIX}kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).",
                                 ["model_name", "replica"], **g),
            kv_free_blocks=Gauge(f"{PREFIX}kv_cache_free_blocks", "Free KV-cache blocks.",
                                 ["model_name", "replica"], **g),
            kv_memory_bytes=Gauge(f"{PREFIX}kv_memory_bytes", "Bytes of KV memory by tier.",
                                  ["model_name", "replica", "tier"], **g),
            sessions_active=Gauge(f"{PREFIX}sessions_active", "Sessions holding KV memory.",
                                  ["model_name", "replica"], **g),
            blocks_retrieved=Counter(f"{PREFIX}blocks_retrieved", "KV memory blocks retrieved by attention.",
                                     ["model_name"], **kw),
            shard_lookup_seconds=Histogram(f"{PREFIX}memory_shard_lookup_seconds", "Submit-to-answer time of one "
                                           "layer-step lookup on one memory shard (retries included).",
                                           ["shard"], buckets=SHARD_BUCKETS, **kw),
            shard_bytes=Counter(f"{PREFIX}memory_shard_bytes", "Bytes moved to and from a memory shard "
                                "(indices + weights sent, rows received).", ["shard"], **kw),
            shard_failures=Counter(f"{PREFIX}memory_shard_failures", "Lookups that failed after the retry bound "
                                   "(the request got UNAVAILABLE naming the shard).", ["shard"], **kw),
            shard_replicas=Gauge(f"{PREFIX}memory_shard_replicas", "Running replicas of each memory shard "
                                 "deployment (as last seen by this process).", ["shard", "replica"], **g),
            memory_lookups=Counter(f"{PREFIX}memory_lookups", "Memory-layer value-table reads (one per memory "
                                   "layer per engine forward, all memory layers together).", ["model_name"], **kw),
            memory_lookup_seconds=Counter(f"{PREFIX}memory_lookup_seconds", "Seconds the engine spent on "
                                          "memory-layer value-table reads (rate / rate of memserve:memory_lookups_total "
                                          "= mean read time).", ["model_name"], **kw),
            memory_lookup_read_seconds=Histogram(f"{PREFIX}memory_lookup_read_seconds", "Seconds of one memory-"
                                                 "layer value-table read, by decoder layer (_count = reads of the "
                                                 "layer, _sum = its seconds).", ["model_name", "layer"],
                                                 buckets=LOOKUP_SECONDS_BUCKETS, **kw),
        )


_METRICS: ServingMetrics | None = None
_LOCK = threading.Lock()


def get_metrics() -> ServingMetrics:
    """This process's metrics (created on first use)."""
    global _METRICS
    with _LOCK:
        if _METRICS is None:
            _METRICS = ServingMetrics.create()
        return _METRICS


@dataclass(slots=True)
class RequestRecorder:
    """Per-request timing: feed it every streamed output, then `finish()`.

    Uses the engine's RequestMetrics when present (arrival/first_scheduled/first_token times),
    else wall-clock times seen here.
    """

    metrics: ServingMetrics
    model_name: str
    arrival: float
    last_token_time: float | None = None
    num_generated: int = 0
    api: str = "grpc"  # "grpc" | "http": which API the request came through (label of every series)

    def on_tokens(self, n_new: int, now: float | None = None) -> None:
        if n_new <= 0:
            return
        now = time.time() if now is None else now
        m = self.metrics
        if self.last_token_time is None:
            m.ttft.labels(self.model_name, self.api).observe(max(0.0, now - self.arrival))
        else:
            # n tokens arriving together (a coalesced chunk) share the gap evenly
            gap = max(0.0, now - self.last_token_time) / n_new
            for _ in range(n_new):
                m.itl.labels(self.model_name, self.api).observe(gap)
        self.last_token_time = now
        self.num_generated += n_new

    def finish(self, finish_reason: str | None, prompt_tokens: int, queue_time: float | None,
               now: float | None = None) -> None:
        now = time.time() if now is None else now
        m = self.metrics
        m.e2e.labels(self.model_name, self.api).observe(max(0.0, now - self.arrival))
        if queue_time is not None:
            m.queue_time.labels(self.model_name, self.api).observe(max(0.0, queue_time))
        m.prompt_tokens.labels(self.model_name, self.api).inc(max(0, prompt_tokens))
        m.generation_tokens.labels(self.model_name, self.api).inc(self.num_generated)
        m.request_success.labels(self.model_name, finish_reason or "abort", self.api).inc()


def set_engine_gauges(m: ServingMetrics, model_name: str, replica: str, stats) -> None:
    """Copy an EngineStats snapshot (runtime/engine_protocol.StatsLike) into the gauges of this replica."""
    m.num_running.labels(model_name, replica).set(stats.num_running)
    m.num_waiting.labels(model_name, replica).set(stats.num_waiting)
    m.kv_cache_usage.labels(model_name, replica).set(stats.kv_cache_usage_perc)
    m.kv_free_blocks.labels(model_name, replica).set(stats.num_free_blocks)
    m.sessions_active.labels(model_name, replica).set(stats.sessions_active)
    for tier, nbytes in stats.kv_memory_bytes.items():
        m.kv_memory_bytes.labels(model_name, replica, str(tier)).set(nbytes)


# ---- exporter (runs in the `memserve serve` driver) ---------------------------------------------

def make_multiproc_dir(base: str | None = None) -> str:
    """A fresh, empty directory for the replicas' metric files."""
    return tempfile.mkdtemp(prefix="memserve-metrics-", dir=base)


_LIVE_FILE = re.compile(r"gauge_live\w*_(\d+)\.db$")


def _mark_dead_pids(path: str) -> None:
    from prometheus_client import multiprocess

    for f in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        mt = _LIVE_FILE.search(f)
        if not mt:
            continue
        pid = int(mt.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, path)
        except PermissionError:
            pass


class _MemservCollector:
    """MultiProcessCollector restricted to memserve:* (other libraries in the replica processes
    may also write multiprocess files) with dead-pid cleanup of live gauges."""

    def __init__(self, path: str):
        from prometheus_client.multiprocess import MultiProcessCollector

        self._path = path
        self._inner = MultiProcessCollector(None, path=path)

    def collect(self):
        _mark_dead_pids(self._path)
        for metric in self._inner.collect():
            if metric.name.startswith(PREFIX):
                yield metric


def start_exporter(path: str, port: int = 8080, addr: str = "127.0.0.1"):
    """Serve the merged metrics of `path` at http://addr:port/metrics. Returns (server, thread).

    Always the classic text format (0.0.4), never OpenMetrics: prometheus-client 0.26's OpenMetrics
    writer escapes ':' in sample names to '_' (it checks sample names with the label-name rune
    set), so a Prometheus that negotiates OpenMetrics would store `memserve_generation_tokens_total`
    instead of `memserve:generation_tokens_total` (found with Prometheus 2.42 in tests/deploy).
    """
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import CONTENT_TYPE_LATEST

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404, "metrics are at /metrics")
                return
            body = render(path)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes every second: keep stderr quiet
            pass

    server = ThreadingHTTPServer((addr, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="memserve-metrics", daemon=True)
    thread.start()
    return server, thread


def render(path: str) -> bytes:
    """The exposition text of `path` (used by tests and `GetModelInfo`-free debugging)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_MemservCollector(path))
    return generate_latest(registry)


def cleanup_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """Standalone exporter for a node whose replicas write into --dir (e.g. a KubeRay worker pod)."""
    ap = argparse.ArgumentParser(prog="python -m memserve.deploy.metrics")
    ap.add_argument("--dir", required=True, help="the replicas' PROMETHEUS_MULTIPROC_DIR")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--addr", default="127.0.0.1")
    a = ap.parse_args(argv)
    start_exporter(a.dir, a.port, a.addr)
    print(f"memserve metrics: http://{a.addr}:{a.port}/metrics (from {a.dir})", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
