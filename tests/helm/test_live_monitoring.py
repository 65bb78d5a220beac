"""Monitoring for real: a running memserve (real local Ray Serve, real gRPC traffic; the engine is the
serving test double so this stays fast) scraped by the real Prometheus with a scrape config derived
from the chart's rendered ServiceMonitor; then every PromQL expression of every dashboard panel and
every alert must return data.

MEMSERVE_DASHBOARD_PNG=path renders the dashboard from the same live data (helm/memserve/README.md's
picture is made this way)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from chart_testlib import ROOT, by_kind, render
from serving_testlib import free_port, prometheus, wait_for

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="prometheus binary missing (Debian package `prometheus`; .ci/run installs it)")
FAKE_DIR = str(ROOT / "tests" / "deploy")
# kube-state-metrics' restart counter exists only in a cluster; that one alert is covered by promtool tests
NEEDS_CLUSTER = {"MemServeReplicaRestarts"}


def scrape_config(service_monitor: dict, target: str, interval: str = "1s") -> dict:
    """Prometheus scrape jobs for a ServiceMonitor's endpoints (what the Prometheus Operator generates,
    with the endpoint's port resolved to `target`; the interval shortened so the test is quick)."""
    jobs = []
    for i, ep in enumerate(service_monitor["spec"]["endpoints"]):
        jobs.append({"job_name": f"serviceMonitor/{service_monitor['metadata']['name']}/{i}",
                     "metrics_path": ep.get("path", "/metrics"), "scrape_interval": interval,
                     "static_configs": [{"targets": [target]}]})
    return {"global": {"evaluation_interval": interval}, "scrape_configs": jobs}


@pytest.fixture(scope="module")
def live():
    import grpc
    import ray
    from memserve.deploy import memserve_pb2 as pb
    from memserve.deploy import memserve_pb2_grpc as pbg
    from memserve.deploy import metrics as M
    from memserve.deploy.app import SERVE_ENV, init_ray, start
    from memserve.deploy.config import AppConfig

    saved_env = {k: os.environ.get(k) for k in SERVE_ENV}
    metrics_dir = M.make_multiproc_dir()
    cfg = AppConfig(model="fake", metrics_dir=metrics_dir, max_waiting=2, unavailable_timeout_s=60,
                    engine_cls="serving_fake_engine:FakeAsyncEngine", sampling_cls="serving_fake_engine:FakeSampling",
                    env_vars={"PYTHONPATH": FAKE_DIR},
                    engine_args={"max_running": 2, "step_s": 0.01, "num_blocks": 256})
    grpc_port, metrics_port, http_port = (free_port() for _ in range(3))
    server, _ = M.start_exporter(metrics_dir, port=metrics_port)
    sys.path.insert(0, FAKE_DIR)
    objs, _ = render()
    (sm,) = by_kind(objs, "ServiceMonitor")
    (rule,) = by_kind(objs, "PrometheusRule")
    init_ray(num_cpus=2, log_to_driver=False, logging_level="ERROR")
    stack = contextlib.ExitStack()
    try:
        start(cfg, grpc_port=grpc_port, http_port=http_port)
        stub = pbg.MemServeStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
        query = stack.enter_context(prometheus(yaml.safe_dump(scrape_config(sm, f"127.0.0.1:{metrics_port}"))))
        # traffic: completions, an ingest and a generation in a session, a client error (INVALID_ARGUMENT)
        t_end = time.monotonic() + 8
        i = 0
        while time.monotonic() < t_end:
            for _ in stub.Generate(pb.GenerateRequest(prompt=f"traffic {i}", sampling=pb.SamplingParams(
                    max_tokens=6, ignore_eos=True)), timeout=60):
                pass
            i += 1
        for _ in stub.Ingest(pb.IngestRequest(session_id="dash", text="some text for a session " * 8), timeout=60):
            pass
        for _ in stub.Generate(pb.GenerateRequest(prompt="and now?", session_id="dash", sampling=pb.SamplingParams(
                max_tokens=6, ignore_eos=True)), timeout=60):
            pass
        try:
            list(stub.Generate(pb.GenerateRequest(), timeout=10))
        except grpc.RpcError:
            pass
        yield {"query": query, "rule": rule, "base": query.base}
    finally:
        stack.close()
        ray.shutdown()
        server.shutdown()
        M.cleanup_dir(metrics_dir)
        sys.path.remove(FAKE_DIR)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace('"$model"', '".*"')


def _alert_lhs(expr: str) -> str:
    """The measured quantity of an alert: its expression without the final threshold comparison;
    absent(x) is checked as x (after traffic, absent() must be empty and x must have data)."""
    e = re.sub(r"\s*[><]=?\s*[0-9.e+-]+\s*$", "", expr.strip())
    m = re.fullmatch(r"absent\((.*)\)", e, flags=re.S)
    return m.group(1) if m else e


def test_every_dashboard_expression_returns_data(live):
    from memserve.deploy.dashboards_gen import exprs

    dash = json.loads((ROOT / "deploy" / "dashboards" / "memserve.json").read_text())
    missing = []
    for title, expr in exprs(dash):
        q = _grafana_to_promql(expr)
        end = time.monotonic() + 20
        while not live["query"](q) and time.monotonic() < end:
            time.sleep(0.5)
        if not live["query"](q):
            missing.append((title, q))
    assert not missing, f"panels without data: {missing}"
    if os.environ.get("MEMSERVE_DASHBOARD_PNG"):
        _render_png(live["base"], dash, os.environ["MEMSERVE_DASHBOARD_PNG"])


def test_every_alert_expression_returns_data_and_none_fires(live):
    rules = [r for g in live["rule"]["spec"]["groups"] for r in g["rules"]]
    checked = 0
    for r in rules:
        if r["alert"] in NEEDS_CLUSTER:
            continue
        lhs = _alert_lhs(r["expr"])
        assert lhs != r["expr"].strip(), f"{r['alert']}: no threshold or absent() found in {r['expr']!r}"
        wait_for(lambda lhs=lhs: live["query"](lhs), 20, f"{r['alert']}: {lhs} to return data", period=0.5)
        checked += 1
    assert checked == len(rules) - len(NEEDS_CLUSTER)
    assert not live["query"]("absent(memserve:num_requests_running)")  # the absent() guard is quiet


def _render_png(base: str, dash: dict, out: str) -> None:
    """The dashboard's panels as a grid of matplotlib plots of the last minutes of live data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = dash["panels"]
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(14, 2.6 * rows))
    end = time.time()
    for ax, p in zip(axes.flat, panels):
        for t in p["targets"]:
            url = base + "/api/v1/query_range?" + urllib.parse.urlencode(
                {"query": _grafana_to_promql(t["expr"]), "start": end - 60, "end": end, "step": 2})
            for s in json.loads(urllib.request.urlopen(url, timeout=10).read())["data"]["result"]:
                xs = [float(v[0]) - end for v in s["values"]]
                ys = [float(v[1]) for v in s["values"]]
                label = re.sub(r"\{\{(\w+)\}\}", lambda m, s=s: s["metric"].get(m.group(1), ""), t.get("legendFormat", ""))
                ax.plot(xs, ys, label=label or None)
        ax.set_title(f"{p['title']} ({p['fieldConfig']['defaults'].get('unit', '')})", fontsize=9)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("memserve dashboard, live data from a real Prometheus scrape (seconds before now)")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
