"""Helpers shared by the serving tests: real servers (Ray Serve, Prometheus) on loopback, and the
in-process worker client that the Ray-free ingress tests use."""

from __future__ import annotations

import asyncio
import contextlib
import json
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

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
