"""Static deploy assets: alert rules pass promtool, the dashboard and rules only use metrics that
deploy/metrics.py defines, the Serve config builds an AppConfig, the stubs match the proto."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from memserve.deploy import memserve_pb2 as pb
from memserve.deploy.config import AppConfig
from memserve.deploy.metrics import ServingMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _defined_names() -> set[str]:
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    ServingMetrics.create(registry=reg)
    names = set()
    for fam in reg.collect():
        for s in fam.samples:
            names.add(s.name)
    names |= {f"{fam.name}{suffix}" for fam in reg.collect() for suffix in ("", "_total", "_bucket", "_count", "_sum")}
    return names


def _used(text: str) -> set[str]:
    return set(re.findall(r"memserve:[a-zA-Z0-9_]+", text))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing (Debian package `prometheus`)")
def test_promtool_check_rules():
    r = subprocess.run(["promtool", "check", "rules", str(DEPLOY / "alerts.yaml")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_rules_and_dashboard_use_defined_metrics():
    defined = _defined_names()
    rules = (DEPLOY / "alerts.yaml").read_text()
    dash = json.loads((DEPLOY / "dashboards" / "memserve.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for name in _used(rules) | _used(exprs) | _used(json.dumps(dash["templating"])):
        assert name in defined, name
    assert len(dash["panels"]) >= 8


def test_issue_metric_names_exist():
    defined = _defined_names()
    for n in ["time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket",
              "request_queue_time_seconds_bucket", "prompt_tokens_total", "generation_tokens_total", "request_success_total",
              "request_errors_total", "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
              "kv_memory_bytes", "sessions_active", "blocks_retrieved_total", "memory_lookups_total",
              "memory_lookup_seconds_total"]:
        assert f"memserve:{n}" in defined, n


def test_serve_config_args_are_a_valid_app_config():
    cfg = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    app = cfg["applications"][0]
    assert app["import_path"] == "memserve.deploy.app:app_builder"
    c = AppConfig(**app["args"])
    assert c.autoscaling_config["max_replicas"] >= c.autoscaling_config["min_replicas"]
    from memserve.deploy.app import grpc_options

    assert cfg["grpc_options"]["grpc_servicer_functions"] == grpc_options().grpc_servicer_functions == [
        "memserve.deploy.memserve_pb2_grpc.add_MemServeServicer_to_server",
        "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]


def test_app_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_waiting"):
        AppConfig(max_waiting=0)
    with pytest.raises(ValueError, match="autoscaling_config"):
        AppConfig(autoscaling_config={"min_replicas": 3, "max_replicas": 1})
    with pytest.raises(ValueError, match="engine_cls"):
        AppConfig(engine_cls="no_colon")


def test_committed_stubs_match_proto(tmp_path):
    """Regenerating from deploy/memserve.proto must give the committed stubs (run `make proto`)."""
    from memserve.deploy.proto_build import build

    # the generator stamps its own version (GRPC_GENERATED_VERSION, "Protobuf Python Version"): a newer
    # grpcio-tools from PyPI must not fail this check (1.85.4 did, against stubs made with 1.85.1)
    # while any change of the generated code still does
    def content(text: str) -> str:
        text = re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = ''", text)
        return re.sub(r"Protobuf Python Version: \S+", "Protobuf Python Version:", text)

    for p in build(tmp_path):
        assert content(p.read_text()) == content((DEPLOY / p.name).read_text()), f"{p.name} is stale: run `make proto`"
    assert pb.DESCRIPTOR.package == "memserve.v1"
    assert set(pb.DESCRIPTOR.services_by_name["MemServe"].methods_by_name) == {
        "Generate", "Ingest", "GetSession", "DeleteSession", "GetModelInfo"}
    assert pb.GenerateRequest.__module__ == "memserve.deploy.memserve_pb2"  # picklable by the Serve proxy
