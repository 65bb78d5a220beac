"""The chart rendered by Helm's own engine (the real helm v4 binary) and checked the way the API
server and the KubeRay operator would: Kubernetes schemas (1.30-1.35), KubeRay v1.7.0's CRD,
Ray's ServeDeploySchema + memserve's app builder, and the operator's run-time rules."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_testlib import CHART, ROOT, VALUES, by_kind, helm, render

GOOD_VALUES = sorted(p.name for p in VALUES.glob("*.yaml") if p.name != "shards.yaml")
K8S_VERSIONS = ["1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0"]
CORE_KINDS = {"ConfigMap", "Service", "PersistentVolumeClaim", "NetworkPolicy", "Pod"}


def serve_config(objs) -> dict:
    (rs,) = by_kind(objs, "RayService")
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


def containers(objs):
    (rs,) = by_kind(objs, "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    pods += [p["spec"] for p in by_kind(objs, "Pod")]
    return pods, [c for p in pods for c in p["containers"]]


@pytest.mark.parametrize("values", [None, *GOOD_VALUES])
def test_renders_and_lints(values):
    files = (values,) if values else ()
    objs, _ = render(*files)
    kinds = {o["kind"] for o in objs}
    assert {"RayService", "Service"} <= kinds
    lint = ["lint", "--strict", str(CHART)] + (["-f", str(VALUES / values)] if values else [])
    helm(*lint)


def test_shards_values_become_app_args_and_build(tmp_path):
    """memoryShards.* -> AppConfig memory_shards / shard_layout / shard_replicas / shard_num_cpus (issue 17);
    the app builds with those args on a tiny memory model sharded the same way (shards.yaml's model path
    exists only in a pod, so it is swapped for that model here)."""
    from memserve.deploy.app import app_builder
    from memserve.deploy.memory_shards import shard_memory
    from tiny_models import make_tiny_memory_model

    objs, _ = render("shards.yaml")
    helm("lint", "--strict", str(CHART), "-f", str(VALUES / "shards.yaml"))
    args = serve_config(objs)["applications"][0]["args"]
    assert (args["memory_shards"], args["shard_layout"], args["shard_replicas"], args["shard_num_cpus"]) == \
        (4, "columns", "1:2", 0.25)
    d = make_tiny_memory_model(tmp_path / "m", v_dim=8)
    shard_memory(d, 4, "columns")
    app_builder({**args, "model": str(d)})  # builds the engine + 4 shard deployments (nothing starts)
    _, p = render("shards.yaml", sets=("memoryShards.replicas.min=3",), check=False)
    assert p.returncode != 0 and "memoryShards.replicas.min (3) must be <= memoryShards.replicas.max (2)" in p.stderr


@pytest.mark.parametrize("values", GOOD_VALUES)
def test_core_objects_validate_on_every_kubernetes_version(values):
    objs, _ = render(values)
    core = [o for o in objs if o["kind"] in CORE_KINDS]
    assert core
    for version in K8S_VERSIONS:
        for o in core:
            kubernetes_validate.validate(o, version, strict=True)  # raises on any error


def _crd_schema(path) -> dict:
    """KubeRay's openAPIV3Schema as JSON Schema, as the API server applies it (../shared/k8s/README.md):
    defaulted properties are not required; int-or-string and preserve-unknown-fields widen types."""
    crd = yaml.safe_load(path.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = copy.deepcopy(v1["schema"]["openAPIV3Schema"])

    def fix(node):
        if isinstance(node, dict):
            props = node.get("properties") or {}
            if "required" in node:
                node["required"] = [r for r in node["required"] if "default" not in props.get(r, {})]
            if node.pop("x-kubernetes-int-or-string", False):
                node.pop("type", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            if node.get("x-kubernetes-preserve-unknown-fields"):
                node.pop("additionalProperties", None)
            elif node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False  # the API server prunes unknown fields: catch them here
            for v in node.values():
                fix(v)
        elif isinstance(node, list):
            for v in node:
                fix(v)

    fix(schema)
    return schema


@pytest.fixture(scope="module")
def rayservice_schema():
    return _crd_schema(ROOT.parent / "shared" / "k8s" / "ray.io_rayservices.yaml")


@pytest.mark.parametrize("values", [None, *GOOD_VALUES])
def test_rayservice_matches_kuberay_crd_and_operator_rules(values, rayservice_schema):
    objs, _ = render(*((values,) if values else ()))
    (rs,) = by_kind(objs, "RayService")
    jsonschema.validate(rs, rayservice_schema)
    # validation.go rules the CRD cannot express
    name = rs["metadata"]["name"]
    assert len(name) <= 47
    assert rs["spec"]["upgradeStrategy"]["type"] in {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
    for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        limits = g["template"]["spec"]["containers"][0]["resources"].get("limits", {})
        for res, param in (("cpu", "num-cpus"), ("nvidia.com/gpu", "num-gpus")):
            assert not (res in limits and param in g["rayStartParams"]), f"{res} both in limits and rayStartParams"


def test_crd_schema_rejects_a_broken_rayservice(rayservice_schema):
    """The converted CRD schema can fail: a misspelt field and a wrong type are caught."""
    objs, _ = render()
    (rs,) = by_kind(objs, "RayService")
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, rayservice_schema)
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, rayservice_schema)


@pytest.mark.parametrize("values", [None, *GOOD_VALUES])
def test_serve_config_parses_with_ray_and_builds_the_app(values):
    from memserve.deploy.app import app_builder
    from ray.serve.schema import ServeDeploySchema

    objs, _ = render(*((values,) if values else ()))
    cfg = serve_config(objs)
    parsed = ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(cfg)
    (app,) = parsed.applications
    assert app.import_path == "memserve.deploy.app:app_builder"
    app_builder(app.args)  # AppConfig validates every arg; builds the deployments (nothing starts)


def test_gpu_values_set_limits_and_engine_gpus_together():
    objs, _ = render("gpu.yaml")
    (rs,) = by_kind(objs, "RayService")
    (g,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert serve_config(objs)["applications"][0]["args"]["engine_num_gpus"] == 1
    assert "num-gpus" not in g["rayStartParams"]  # KubeRay derives it from the limit


def test_autoscaling_agrees_between_serve_and_ray():
    objs, _ = render("autoscaling.yaml")
    (rs,) = by_kind(objs, "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (g,) = cluster["workerGroupSpecs"]
    auto = serve_config(objs)["applications"][0]["args"]["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"]) == (g["minReplicas"], g["maxReplicas"]) == (1, 4)
    objs, _ = render("cpu.yaml")
    (rs,) = by_kind(objs, "RayService")
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is False
    assert serve_config(objs)["applications"][0]["args"]["num_replicas"] == 2


@pytest.mark.parametrize("values", [None, *GOOD_VALUES])
def test_every_container_is_restricted(values):
    objs, _ = render(*((values,) if values else ()))
    pods, ctrs = containers(objs)
    for p in pods:
        assert p["securityContext"]["runAsNonRoot"] is True
        assert p["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for c in ctrs:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["runAsNonRoot"] is True
        assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert "limits" in c["resources"]


def test_every_ray_pod_runs_the_metrics_exporter():
    objs, _ = render("cpu.yaml")
    pods, _ = containers(objs)
    ray_pods = pods[:2]
    for p in ray_pods:
        names = [c["name"] for c in p["containers"]]
        assert "metrics-exporter" in names
    (svc,) = [s for s in by_kind(objs, "Service") if s["metadata"]["name"].endswith("-metrics")]
    (sm,) = by_kind(objs, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]


@pytest.mark.parametrize("bad,needle", [
    ("engine.replica.min=2", "replica"),                 # misspelt nested key
    ("monitoring.serviceMonitor.enable=false", "enable"),
    ("imag.tag=x", "imag"),                              # misspelt top-level key
    ("app.max_waitng=3", "max_waitng"),                  # misspelt AppConfig field
    ("app.max_waiting=0", "max_waiting"),                # AppConfig's own bound (ge=1)
    ("upgradeStrategy.type=Rolling", "upgradeStrategy"),
    ("nameOverride=Memserve_Prod", "nameOverride"),      # not DNS-1035
    ("nameOverride=" + "a" * 48, "nameOverride"),        # > 47 characters
    ("engine.gpus=-1", "gpus"),
])
def test_mistakes_are_rejected(bad, needle):
    _, p = render(sets=(bad,), check=False)
    assert p.returncode != 0 and needle in p.stderr, p.stderr


def test_min_above_max_replicas_fails():
    _, p = render(sets=("engine.replicas.min=3", "engine.replicas.max=2"), check=False)
    assert p.returncode != 0 and "engine.replicas.min (3) must be <= engine.replicas.max (2)" in p.stderr


def test_long_release_name_fails_without_override():
    _, p = render(release="r" * 48, check=False)
    assert p.returncode != 0 and "at most 47" in p.stderr


def test_ray_containers_get_the_serve_env_of_a_local_cluster():
    """Throughput-optimized Serve, gRPC between proxy / ingress / engine and its receive limit, nice 0:
    the same settings `memserve serve` gives a local cluster (deploy/app.py SERVE_ENV)."""
    from memserve.deploy.app import SERVE_ENV

    _, ctrs = containers(render()[0])
    ray_ctrs = [c for c in ctrs if c["name"].startswith("ray-")]
    assert len(ray_ctrs) >= 2
    for c in ray_ctrs:
        envs = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert {k: envs.get(k) for k in SERVE_ENV} == SERVE_ENV, c["name"]


def test_api_keys_come_only_from_an_existing_secret():
    objs, p = render("auth.yaml")
    assert not by_kind(objs, "Secret")
    pods, ctrs = containers(objs)
    vols = [v for pod in pods for v in pod.get("volumes", []) if "secret" in v]
    assert vols and all(v["secret"]["secretName"] == "memserve-api-keys" for v in vols)
    envs = {e["name"]: e.get("value") for c in ctrs for e in c.get("env", [])}
    assert envs["MEMSERVE_API_KEYS_FILE"] == "/etc/memserve/auth/api-keys"
    # the schema has no place for a key value: a plaintext key is an unknown value
    _, p = render(sets=("auth.apiKey=sk-123",), check=False)
    assert p.returncode != 0 and "sk-123" not in p.stdout


def test_monitoring_toggles():
    objs, _ = render("monitoring-off.yaml")
    kinds = {o["kind"] for o in objs}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}
    assert not [c for c in by_kind(objs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboards")]
    objs, _ = render()
    (cm,) = [c for c in by_kind(objs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboards")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["memserve.json"])
    assert dash == json.loads((ROOT / "deploy" / "dashboards" / "memserve.json").read_text())


def test_alert_thresholds_come_from_values():
    objs, _ = render(sets=("monitoring.prometheusRule.thresholds.queueDepth=7",))
    (rule,) = by_kind(objs, "PrometheusRule")
    exprs = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert exprs["MemServeRequestsWaiting"].strip().endswith("> 7")


@pytest.mark.parametrize("script", ["helm/gen_schema.py", "helm/sync_monitoring.py", "deploy/dashboards_gen.py"])
def test_generated_files_are_current(script):
    p = subprocess.run([sys.executable, str(ROOT / script), "--check"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr + p.stdout


def test_dockerfile_matches_the_chart():
    """The image the chart names: CPU and CUDA variants, uid 1000 (the chart's runAsUser), and a CMD
    whose flags `memserve serve` accepts."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "ARG VARIANT=cpu" in text and "AS base-cpu" in text and "AS base-cuda" in text
    assert "USER 1000:1000" in text
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["tag"].endswith("-cpu")
    assert yaml.safe_load((VALUES / "gpu.yaml").read_text())["image"]["tag"].endswith("-cuda")
    (cmd,) = [line for line in text.splitlines() if line.startswith("CMD")]
    args = json.loads(cmd[len("CMD"):])
    from memserve.deploy.cli import build_parser

    build_parser().parse_args(args)  # SystemExit on an unknown flag


def _grpc_service(objs):
    (svc,) = [s for s in by_kind(objs, "Service") if s["metadata"]["name"].endswith("-grpc")]
    return svc


def test_tls_off_renders_no_proxy():
    objs, _ = render()
    pods, ctrs = containers(objs)
    assert "tls-proxy" not in [c["name"] for c in ctrs]
    assert not [c for c in by_kind(objs, "ConfigMap") if c["metadata"]["name"].endswith("-tls-nginx")]
    svc = _grpc_service(objs)
    assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]][0] == ("grpc", 9000, "grpc")
    assert "memserve.io/role" not in svc["spec"]["selector"]  # every pod's Serve proxy


def test_tls_on_puts_nginx_before_the_grpc_port():
    objs, _ = render("tls.yaml", sets=("tls.port=9555", "grpc.port=9100", "tls.httpPort=9556", "http.port=9101"))
    (rs,) = by_kind(objs, "RayService")
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    (proxy,) = [c for c in head["spec"]["containers"] if c["name"] == "tls-proxy"]
    assert proxy["ports"] == [{"name": "grpc-tls", "containerPort": 9555, "protocol": "TCP"},
                              {"name": "https-tls", "containerPort": 9556, "protocol": "TCP"}]
    # only the head has it; workers keep their plain containers
    for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert "tls-proxy" not in [c["name"] for c in g["template"]["spec"]["containers"]]
    vols = {v["name"]: v for v in head["spec"]["volumes"]}
    assert vols["tls-cert"]["secret"]["secretName"] == "memserve-tls"
    assert {i["key"] for i in vols["tls-cert"]["secret"]["items"]} == {"tls.crt", "tls.key"}  # kubernetes.io/tls keys
    (cm,) = [c for c in by_kind(objs, "ConfigMap") if c["metadata"]["name"].endswith("-tls-nginx")]
    assert vols["tls-nginx"]["configMap"]["name"] == cm["metadata"]["name"]
    conf = cm["data"]["nginx.conf"]
    assert "listen 9555 ssl http2;" in conf and "grpc_pass grpc://127.0.0.1:9100;" in conf
    assert "listen 9556 ssl;" in conf and "proxy_pass http://127.0.0.1:9101;" in conf and "proxy_buffering off;" in conf
    assert conf.count(f"client_max_body_size {64 << 20};") == 2
    mounts = {m["mountPath"] for m in proxy["volumeMounts"]}
    assert {"/etc/memserve/tls", "/etc/memserve/nginx", "/tmp"} <= mounts
    # the Service sends gRPC to the sidecar, on the head only; the plaintext port is not exposed
    svc = _grpc_service(objs)
    assert svc["spec"]["selector"]["memserve.io/role"] == "head"
    assert head["metadata"]["labels"]["memserve.io/role"] == "head"
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert "grpc" not in ports and ports["grpc-tls"]["port"] == 9555 and ports["grpc-tls"]["targetPort"] == "grpc-tls"
    assert "http" not in ports and ports["https"]["port"] == 9556 and ports["https"]["targetPort"] == "https-tls"
    # `helm test` trusts the Secret's certificate (its command: test_helm_test_pod_command_runs)
    (pod,) = by_kind(objs, "Pod")
    assert pod["spec"]["volumes"][0]["secret"] == {"secretName": "memserve-tls", "items": [{"key": "tls.crt", "path": "ca.crt"}]}
    (np,) = by_kind(objs, "NetworkPolicy")
    client_ports = [p["port"] for r in np["spec"]["ingress"] for p in r.get("ports", [])]
    assert {9555, 9556} <= set(client_ports) and not {9100, 9101} & set(client_ports)


def test_tls_without_a_secret_fails_with_a_message():
    _, p = render(sets=("tls.enabled=true",), check=False)
    assert p.returncode != 0 and "tls.secretName" in p.stderr and "kubernetes.io/tls" in p.stderr
    _, p = render(sets=("tls.enabled=true", "tls.secretName=x", "tls.prt=1"), check=False)
    assert p.returncode != 0 and "prt" in p.stderr


@pytest.mark.parametrize("values, address, tls, key", [
    (None, "memserve-grpc:9000", False, None),
    ("auth.yaml", "memserve-prod-grpc:9000", False, "k" * 20 + "-first"),
    ("tls.yaml", "memserve-grpc:9443", True, "k" * 20 + "-first"),
])
def test_helm_test_pod_command_runs(values, address, tls, key, tmp_path):
    """The `helm test` pod's shell script run by the real sh, with a stand-in `memserve` that records
    its environment and arguments; the arguments must parse with memserve's own CLI parser."""
    from memserve.deploy.cli import build_parser

    objs, _ = render(*((values,) if values else ()))
    (pod,) = by_kind(objs, "Pod")
    cmd = pod["spec"]["containers"][0]["command"]
    assert cmd[:2] == ["sh", "-c"]
    keys = tmp_path / "api-keys"
    keys.write_text("# tenants\n\n   # indented comment\nteam-a " + "k" * 20 + "-first\nteam-b " + "k" * 20 + "-second\n")
    script = cmd[2].replace("/etc/memserve/auth/api-keys", str(keys))
    fake = tmp_path / "bin" / "memserve"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "KEY=${MEMSERVE_API_KEY-unset}" "$@" > "$OUT"\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "OUT": str(out)}
    subprocess.run(["sh", "-c", script], env=env, check=True, timeout=30)
    got = out.read_text().splitlines()
    assert got[0] == f"KEY={key if key else 'unset'}"
    a = build_parser().parse_args(got[1:])
    assert a.fn.__name__ == "cmd_generate" and a.address == address and a.prompt == "The capital of France is"
    assert (a.tls_ca == "/etc/memserve/tls/ca.crt") if tls else a.tls_ca is None
    mounts = {m["mountPath"] for m in pod["spec"]["containers"][0].get("volumeMounts", [])}
    assert ("/etc/memserve/auth" in mounts) == bool(key) and ("/etc/memserve/tls" in mounts) == tls
