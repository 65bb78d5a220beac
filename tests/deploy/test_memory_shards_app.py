"""Memory shards wired into the serving app (issue 17): `build_app` with memory_shards = P deploys P
MemoryShard deployments per value table beside the engine; the engine replicas read their tables
through them. Real local Ray Serve, real gRPC client (Serve's proxy), tiny random-weight memory models.

Reference: the same model in-engine (P = 0, TensorValueStore). Greedy tokens come over gRPC; logits
from the engine's model forward in this process with its tables replaced by RemoteValueStores over
handles to the *app's* shard deployments (gRPC has no logits field). Columns: bit-for-bit. Rows:
the engine adds P partial bags, so each output element's fp32 sum of K products is re-associated;
the bound is |d| <= 2 (K - 1) u sum_k |w_k v_k| per bag element (u = 2**-24), and what reaches the
logits is measured below (ROWS_LOGIT_ATOL, with the greedy tokens identical).

One Ray cluster for the module (run under `flock /tmp/memserve-ray.lock`); one app per layout at
P = 3 in the fast set, P = 1 and 2 slow-marked (each deploys and then deletes its app).
"""

from __future__ import annotations

import grpc
import pytest
import torch
from memserve.deploy import memserve_pb2 as pb
from memserve.deploy import memserve_pb2_grpc as pbg
from serving_testlib import free_port, local_ray

ray = pytest.importorskip("ray")

ENGINE_ARGS = {"num_kv_blocks": 64, "block_size": 16, "progress": False, "max_num_seqs": 4}
V_DIM = 50  # 50 columns / 3 and 64 rows / 3 are uneven splits
PROMPTS = [[5, 17, 300, 4000, 12, 9, 77], [101, 202, 303, 404, 505, 606, 707, 808, 909, 1000, 11]]
MAX_TOKENS = 10
# measured max |logit difference| rows vs local on these models: see test output; the bound holds with margin
ROWS_LOGIT_ATOL = 1e-4
# (layout, P, shared value table, topology): the fast pair covers both layouts, one and two tables, both topologies
FAST = [("columns", 3, False, "ingress"), ("rows", 3, True, "direct")]
SLOW = [(lay, p, True, "ingress") for lay in ("columns", "rows") for p in (1, 2)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny_models import make_tiny_memory_model

    return {shared: make_tiny_memory_model(tmp_path_factory.mktemp(f"mem-{shared}"), mode="parallel", seed=3,
                                           shared_values=shared, v_dim=V_DIM) for shared in (True, False)}


@pytest.fixture(scope="module")
def cluster():
    from memserve.deploy.app import grpc_options
    from ray import serve

    port = free_port()
    with local_ray():
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()}, grpc_options=grpc_options(port))
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        yield {"stub": pbg.MemServeStub(channel), "serve": serve}
        channel.close()


def _deploy(cluster, models, layout, P, shared, topology):
    from memserve.deploy.app import build_app
    from memserve.deploy.config import AppConfig
    from memserve.deploy.memory_shards import shard_memory

    d = models[shared]
    shard_memory(d, P, layout)
    name = f"mem-{layout}-{P}"
    cfg = AppConfig(app_name=name, model=str(d), topology=topology, engine_args=ENGINE_ARGS, engine_threads=1,
                    memory_shards=P, shard_layout=layout, shard_replicas="1")
    cluster["serve"].run(build_app(cfg), name=name, route_prefix=f"/{name}", blocking=False)
    return name, d


def _generate(stub, app, prompt):
    req = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                                                 ignore_eos=True))
    msgs = list(stub.Generate(req, timeout=180, metadata=(("application", app),)))
    return [t for m in msgs for t in m.token_ids]


def _local_llm(d):
    from memserve.runtime import LLM

    return LLM(str(d), **ENGINE_ARGS)


def _check_app(cluster, models, layout, P, shared, topology):
    from memserve.deploy.memory_shard_app import attach_remote_stores
    from memserve.deploy.memory_shards import load_specs
    from memserve.runtime import SamplingParams
    from tiny_models import prefill_logits

    serve, stub = cluster["serve"], cluster["stub"]
    app, d = _deploy(cluster, models, layout, P, shared, topology)
    local = _local_llm(d)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = local.generate(PROMPTS, params, use_tqdm=False)
    # 1. greedy tokens over real gRPC through the app's shards == in-engine
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert _generate(stub, app, prompt) == list(out.token_ids), (layout, P)
    # 2. logits (fp32) through the same shard deployments (handles from this process) vs in-engine
    plan = load_specs(d, P, layout)
    shards = {t: {"specs": [s.to_dict() for s in specs],
                  "handles": [serve.get_deployment_handle(s.name, app_name=app) for s in specs]}
              for t, specs in plan.items()}
    remote = _local_llm(d)
    stores = attach_remote_stores(remote.engine.model, shards)
    assert len(stores) == len(plan) == (1 if shared else 2) and all(s.num_shards == P for s in stores)
    worst = 0.0
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = prompt + list(out.token_ids)
        want, got = prefill_logits(local, ids), prefill_logits(remote, ids)
        assert got.dtype == torch.float32 and got.shape == want.shape
        if layout == "columns" or P == 1:
            assert torch.equal(got, want), f"{layout} P={P}: logits must be bit-exact"
        else:
            worst = max(worst, (got - want).abs().max().item())
    if layout == "rows" and P > 1:
        print(f"rows P={P}: max |logit - in-engine logit| = {worst:.3g}")
        assert worst <= ROWS_LOGIT_ATOL
    assert sum(s.lookups for s in stores) > 0
    return app, plan


@pytest.mark.parametrize("layout, P, shared, topology", FAST, ids=[f"{c[0]}-{c[1]}" for c in FAST])
def test_app_through_shards_equals_in_engine(cluster, models, layout, P, shared, topology):
    app, plan = _check_app(cluster, models, layout, P, shared, topology)
    # GetModelInfo lists every shard: name, layout, slice, running replicas
    mi = cluster["stub"].GetModelInfo(pb.GetModelInfoRequest(), timeout=60, metadata=(("application", app),))
    got = [(s.name, s.layout, s.begin, s.end, s.replicas) for s in mi.memory_layers.shards]
    want = [(s.name, layout, s.begin, s.end, 1) for specs in plan.values() for s in specs]
    assert sorted(got) == sorted(want)


@pytest.mark.slow  # one more app start each (~20 s on 2 cores)
@pytest.mark.parametrize("layout, P, shared, topology", SLOW, ids=[f"{c[0]}-{c[1]}" for c in SLOW])
def test_app_through_fewer_shards_equals_in_engine(cluster, models, layout, P, shared, topology):
    app, _ = _check_app(cluster, models, layout, P, shared, topology)
    cluster["serve"].delete(app, _blocking=True)


def test_bad_shard_settings_fail_at_start_naming_the_flag(models, tmp_path):
    from memserve.deploy.app import build_app
    from memserve.deploy.config import AppConfig
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="shard_replicas"):
        AppConfig(model=str(models[True]), memory_shards=2, shard_replicas="3:1")
    with pytest.raises(ValidationError, match="shard_replicas"):
        AppConfig(model=str(models[True]), memory_shards=2, shard_replicas="two")
    with pytest.raises(ValidationError, match="memory_shards"):
        AppConfig(model="default", memory_shards=2)
    with pytest.raises(ValidationError, match="shard_layout"):
        AppConfig(model=str(models[True]), memory_shards=2, shard_layout="diagonal")
    with pytest.raises(ValueError, match="--memory-shards 5.*memserve shard-memory"):  # files not written for P=5
        build_app(AppConfig(model=str(models[True]), memory_shards=5))


# ---- the command line (no Ray) ---------------------------------------------------------------------
def test_shard_memory_cli_writes_shards_with_progress(models, capsys):
    import json

    from memserve.deploy import cli

    d = models[False]
    assert cli.main(["shard-memory", str(d), "--shards", "2", "--layout", "rows"]) == 0
    cap = capsys.readouterr()
    assert "shard-memory rows x2" in cap.err and "100%" in cap.err  # the progress bar over the bytes written
    assert "--memory-shards 2 --shard-layout rows" in cap.out
    m = json.loads((d / "memory_shards" / "rows-2" / "manifest.json").read_text())
    assert len(m["tables"]) == 2 and all([(f["begin"], f["end"]) for f in t["shards"]] == [(0, 32), (32, 64)]
                                         for t in m["tables"].values())


def test_shard_memory_cli_errors(models, tmp_path, capsys):
    from memserve.deploy import cli
    from tiny_models import make_tiny_model

    dense = make_tiny_model(tmp_path / "dense", "llama", with_tokenizer=False)
    assert cli.main(["shard-memory", str(dense), "--shards", "2"]) == 2
    assert "no memory-layer value table" in capsys.readouterr().err
    assert cli.main(["shard-memory", str(models[True]), "--shards", str(V_DIM + 1)]) == 2
    err = capsys.readouterr().err
    assert f"table model.memory_values.weight has {V_DIM} columns" in err and f"<= {V_DIM}" in err
    assert not (models[True] / "memory_shards" / f"columns-{V_DIM + 1}").exists()  # nothing written
    assert cli.main(["shard-memory", str(tmp_path / "nope"), "--shards", "2"]) == 2
    assert "not a model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: invalid choice
        cli.main(["shard-memory", str(models[True]), "--shards", "2", "--layout", "diagonal"])
    assert "invalid choice: 'diagonal'" in capsys.readouterr().err


@pytest.mark.parametrize("flags, needle", [
    (["--memory-shards", "7"], "--memory-shards 7 --shard-layout columns"),
    (["--memory-shards", "2", "--shard-replicas", "3:1"], "--shard-replicas"),
    (["--memory-shards", "-1"], "memory_shards"),
])
def test_serve_bad_shard_flags_fail_before_ray_starts(models, flags, needle, monkeypatch):
    from memserve.deploy import app, cli

    monkeypatch.setattr(app, "init_ray", lambda **kw: pytest.fail("Ray must not start on bad settings"))
    with pytest.raises(SystemExit) as ei:
        cli.main(["serve", "--model", str(models[True]), "--session-store", "none", *flags])
    assert needle in str(ei.value), ei.value


def test_replica_watch_sets_model_info_replicas_and_gauge():
    """What GetModelInfo's MemoryShardInfo.replicas and memserve:memory_shard_replicas read: Serve's
    status (RUNNING replicas per shard deployment of the app; a shard not in it counts 0)."""
    from types import SimpleNamespace as NS

    from memserve.deploy.memory_shard_app import ShardReplicaWatch
    from memserve.deploy.metrics import ServingMetrics
    from memserve.deploy.remote_value_store import RemoteValueStore
    from prometheus_client import CollectorRegistry

    names = ["MemoryShard-t0-0of2", "MemoryShard-t0-1of2"]
    store = RemoteValueStore("model.memory_values.weight", [object(), object()], names, "columns", 64, 50)
    reg = CollectorRegistry()
    watch = ShardReplicaWatch([store], "app", "r0", ServingMetrics.create(registry=reg))
    assert watch.stale()
    status = NS(applications={"app": NS(deployments={names[0]: NS(replica_states={"RUNNING": 2, "STARTING": 1})})})
    watch.refresh(status)
    assert [(d["name"], d["begin"], d["end"], d["replicas"]) for d in store.shard_info()] == \
        [(names[0], 0, 25, 2), (names[1], 25, 50, 0)]
    for n, want in zip(names, (2, 0), strict=True):
        assert reg.get_sample_value("memserve:memory_shard_replicas", {"shard": n, "replica": "r0"}) == want
    assert not watch.stale()


@pytest.mark.slow  # waits for Serve to replace the killed replica
def test_shard_replica_killed_mid_generation_same_tokens(cluster, models):
    """A shard replica dies while a generation streams through the app: the engine re-sends the
    lookups (Serve starts a replacement) and the generation completes with the in-engine tokens."""
    from memserve.deploy.app import build_app
    from memserve.deploy.config import AppConfig
    from memserve.deploy.memory_shards import load_specs, shard_memory
    from memserve.runtime import SamplingParams
    from ray.util import list_named_actors

    d, app = models[True], "mem-kill"
    shard_memory(d, 2, "columns")
    cfg = AppConfig(app_name=app, model=str(d), engine_args=ENGINE_ARGS, engine_threads=1, memory_shards=2,
                    shard_retry_timeout_s=150)
    cluster["serve"].run(build_app(cfg), name=app, route_prefix=f"/{app}", blocking=False)
    victim = load_specs(d, 2, "columns")["model.memory_values.weight"][0].name
    prefix = f"SERVE_REPLICA::{app}#{victim}#"
    actors = [a["name"] for a in list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    assert len(actors) == 1, actors
    n = 400
    want = _local_llm(d).generate([PROMPTS[0]], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                                  use_tqdm=False)[0].token_ids
    req = pb.GenerateRequest(prompt_token_ids=PROMPTS[0], sampling=pb.SamplingParams(max_tokens=n, temperature=0.0,
                                                                                     ignore_eos=True))
    got, after_kill = [], 0
    for m in cluster["stub"].Generate(req, timeout=300, metadata=(("application", app),)):
        if got and not after_kill:
            ray.kill(ray.get_actor(actors[0], namespace="serve"), no_restart=True)
            after_kill = -1
        elif after_kill:
            after_kill = max(after_kill, 0) + len(m.token_ids)
        got.extend(m.token_ids)
    assert got == list(want)
    assert after_kill > 0, "the generation must still be running when the replica is killed"
    cluster["serve"].delete(app, _blocking=True)


@pytest.mark.slow  # two shard-replica changes under load (~1-2 min on 2 cores)
def test_shard_replicas_scale_1_2_1_under_load_same_tokens(cluster, models):
    """Shard replicas go 1 -> 2 -> 1 while two clients keep generating through the app: 0 failed
    requests, every generation has the in-engine tokens, and the engine replica is the same process
    throughout. The app is deployed from a config as `serve deploy` does, and the replica count is the
    config's per-deployment override (a lightweight update: only the shard deployments change). Not
    `shard_replicas` in the app's args, nor serve.run: args are part of an app's code version and
    serve.run gives every deployment a new random version, so either replaces every replica (measured
    here: a new engine replica, 0 failed requests). With MIN:MAX, Serve's autoscaler changes the count
    the same lightweight way."""
    import threading

    from memserve.deploy.app import ENGINE_DEPLOYMENT, serve_actor_pids
    from memserve.deploy.config import AppConfig
    from memserve.deploy.memory_shards import load_specs, shard_memory
    from memserve.runtime import SamplingParams
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema
    from serving_testlib import wait_for

    serve, stub = cluster["serve"], cluster["stub"]
    d, app, n = models[True], "mem-scale", 32
    shard_memory(d, 2, "columns")
    names = [s.name for s in load_specs(d, 2, "columns")["model.memory_values.weight"]]

    cfg = AppConfig(app_name=app, model=str(d), engine_args=ENGINE_ARGS, engine_threads=1, memory_shards=2,
                    shard_retry_timeout_s=120)

    def deploy(replicas: int):
        _get_global_client().deploy_apps(ServeDeploySchema.parse_obj({"applications": [{
            "name": app, "route_prefix": f"/{app}", "import_path": "memserve.deploy.app:app_builder",
            "args": cfg.model_dump(), "deployments": [{"name": nm, "num_replicas": replicas} for nm in names]}]}))

    def running(k: int) -> bool:
        st = serve.status().applications.get(app)
        return st is not None and st.status == "RUNNING" and all(
            st.deployments[nm].replica_states.get("RUNNING", 0) == k and len(st.deployments[nm].replica_states) == 1
            for nm in names)

    deploy(1)
    wait_for(lambda: running(1), 180, "the app with 1 replica per shard")
    engine = serve_actor_pids(app, ENGINE_DEPLOYMENT)
    want = [list(o.token_ids) for o in _local_llm(d).generate(
        PROMPTS, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), use_tqdm=False)]
    stop, errors, done = threading.Event(), [], []

    def client(k: int):
        req = pb.GenerateRequest(prompt_token_ids=PROMPTS[k], sampling=pb.SamplingParams(
            max_tokens=n, temperature=0.0, ignore_eos=True))
        while not stop.is_set():
            try:
                msgs = list(stub.Generate(req, timeout=300, metadata=(("application", app),)))
                if [t for m in msgs for t in m.token_ids] != want[k]:
                    errors.append(f"prompt {k}: tokens differ from in-engine")
            except grpc.RpcError as e:  # a failed request: counted, asserted 0 below
                errors.append(f"{e.code()}: {e.details()}")
            done.append(k)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(len(PROMPTS))]
    for t in threads:
        t.start()
    try:
        for k in (2, 1):
            mark = len(done)
            wait_for(lambda mark=mark: len(done) >= mark + 2, 120, "requests before scaling")
            deploy(k)
            wait_for(lambda k=k: running(k), 180, f"{k} replicas per shard")
            mark = len(done)
            wait_for(lambda mark=mark: len(done) >= mark + 2, 120, f"requests after scaling to {k}")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)
    assert not errors, errors[:3]
    assert serve_actor_pids(app, ENGINE_DEPLOYMENT) == engine, "the engine replica must not restart"
    print(f"scale 1 -> 2 -> 1 under load: {len(done)} requests, 0 failed")
    serve.delete(app, _blocking=True)


@pytest.mark.slow  # a shard replica killed and kept from restarting, then restored (~1-2 min on 2 cores)
def test_shard_down_through_app_is_unavailable_naming_it(cluster, models):
    """A shard whose replica died and cannot come back (its slice file is gone, so every replacement
    fails in its constructor): a generation through the app fails with gRPC UNAVAILABLE naming the
    shard after the retry bound, never a silent zero row; with the file back, Serve's next replacement
    starts and the app serves the in-engine tokens again."""
    import os

    from memserve.deploy.app import build_app
    from memserve.deploy.config import AppConfig
    from memserve.deploy.memory_shards import load_specs, shard_memory
    from memserve.runtime import SamplingParams
    from ray.util import list_named_actors
    from serving_testlib import wait_for

    serve, stub = cluster["serve"], cluster["stub"]
    d, app = models[True], "mem-down"
    shard_memory(d, 2, "columns")
    victim = load_specs(d, 2, "columns")["model.memory_values.weight"][1]
    cfg = AppConfig(app_name=app, model=str(d), engine_args=ENGINE_ARGS, engine_threads=1, memory_shards=2,
                    shard_retry_timeout_s=6)
    serve.run(build_app(cfg), name=app, route_prefix=f"/{app}", blocking=False)
    want = list(_local_llm(d).generate([PROMPTS[0]], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                                    ignore_eos=True), use_tqdm=False)[0].token_ids)
    wait_for(lambda: _try_generate(stub, app) == want, 180, "the app serving")
    prefix = f"SERVE_REPLICA::{app}#{victim.name}#"
    (name,) = [a["name"] for a in list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    os.rename(victim.path, victim.path + ".gone")
    try:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        with pytest.raises(grpc.RpcError) as ei:
            _generate(stub, app, PROMPTS[0])
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value.details()
        assert f"memory shard {victim.name} unavailable" in ei.value.details(), ei.value.details()
    finally:
        os.rename(victim.path + ".gone", victim.path)
    wait_for(lambda: _try_generate(stub, app) == want, 240, "the shard back and the app serving")
    serve.delete(app, _blocking=True)


def _try_generate(stub, app):
    try:
        return _generate(stub, app, PROMPTS[0])
    except grpc.RpcError:
        return None
