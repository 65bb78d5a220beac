"""Helpers shared by the serving tests: real servers (Ray Serve, Prometheus) on loopback, and the
in-process worker client that the Ray-free ingress tests use."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from memserve.deploy.app import _LocalStream  # pulls lazily, like a slow transport


class LocalClient:
    """The ingress's worker client without Ray: calls an in-process EngineWorker directly."""

    def __init__(self, worker):
        self.worker = worker

    def stream(self, method, *args, routing):
        return _LocalStream(getattr(self.worker, method)(*args))

    async def call(self, method, *args, routing=None):
        res = getattr(self.worker, method)(*args)
        return await res if asyncio.iscoroutine(res) else res

    async def num_replicas(self):
        return 1



@contextlib.contextmanager
def local_ray():
    """A local Ray cluster for one test module (2 CPUs, quiet): shut down afterwards, and the Serve env
    vars that init_ray sets for a local cluster put back as they were."""
    import os

    import ray
    from memserve.deploy.app import SERVE_ENV, init_ray

    saved = {k: os.environ.get(k) for k in SERVE_ENV}
    init_ray(num_cpus=2, log_to_driver=False, logging_level="ERROR")
    try:
        yield ray
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

# Test servers listen on ports drawn from 20000-32767: below Linux's ephemeral range (32768-60999),
# where every outgoing connection and every bind to port 0 lands -- Ray's own components pick their
# ports there too (bind(0), then a random port above it) -- and above Ray's worker ports
# (10002-19999). A port from bind(0) was free when asked but taken by Ray's start-up before Serve's
# proxy bound it: a clean-clone CI run failed 24 tests with "Failed to bind to address [::]:40033".
_TEST_PORTS = (20000, 32767)
_handed_out: set[int] = set()


def _bindable(family: socket.AddressFamily, port: int) -> bool:
    try:
        with socket.socket(family) as s:
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        return True
    except OSError:
        return False


def _ipv6() -> bool:
    try:
        socket.socket(socket.AF_INET6).close()
        return True
    except OSError:
        return False


_FAMILIES = (socket.AF_INET, socket.AF_INET6) if _ipv6() else (socket.AF_INET,)


def free_port() -> int:
    """A port nobody listens on now (IPv4 and IPv6 wildcard, as gRPC binds [::]), outside the ranges
    that Ray and the kernel hand out, and never the same one twice in this process."""
    rng = random.Random()  # seeded from os.urandom: parallel test processes draw differently
    for _ in range(500):
        port = rng.randint(*_TEST_PORTS)
        if port in _handed_out:
            continue
        if not all(_bindable(family, port) for family in _FAMILIES):
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {_TEST_PORTS} after 500 tries")


def wait_for(cond, timeout_s: float, what: str, period: float = 0.2):
    """Poll cond() until it returns something truthy (returned); AssertionError after timeout_s."""
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(period)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


@contextlib.contextmanager
def prometheus(config_yaml: str):
    """A real Prometheus server (Debian's `prometheus`) with this config on a free loopback port;
    yields query(promql) -> result list, with .base set to its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="memserve-prom-") as d:
        cfg = Path(d) / "prometheus.yml"
        cfg.write_text(config_yaml)
        proc = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={d}/data",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        base = f"http://127.0.0.1:{port}"
        try:
            def ready():
                if proc.poll() is not None:
                    raise AssertionError(f"prometheus exited: {proc.stderr.read().decode()[-2000:]}")
                try:
                    return urllib.request.urlopen(base + "/-/ready", timeout=2).status == 200
                except OSError:
                    return False

            wait_for(ready, 30, "prometheus to be ready")

            def query(q: str) -> list:
                url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": q})
                body = json.loads(urllib.request.urlopen(url, timeout=10).read())
                assert body["status"] == "success", body
                return body["data"]["result"]

            query.base = base
            yield query
        finally:
            proc.kill()
            proc.wait(timeout=10)
