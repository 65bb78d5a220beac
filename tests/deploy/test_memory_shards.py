"""Memory shards (issue 17) at the value-store level: shard files, MemoryShard, RemoteValueStore.

Reference: the in-engine TensorValueStore on the whole table (what the model uses with P = 0), and a
float64 sum from the formula. In-process tests run MemoryShard objects directly; the Serve tests
run real MemoryShard deployments on one local Ray cluster shared by the module (run under
`flock /tmp/memserve-ray.lock`), with a shard replica killed, scaled 1 -> 2 -> 1 under load and
deleted for good.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from memserve.deploy.memory_shards import MemoryShard, load_specs, shard_memory, split
from memserve.deploy.remote_value_store import MemoryShardUnavailableError, RemoteValueStore
from memserve.runtime.memory_layers import TensorValueStore
from serving_testlib import local_ray, wait_for

TABLE = "model.memory_values.weight"
ROWS, DIM = 8192, 250  # 8 MB fp32; 250 columns do not divide by 3 (uneven column splits)


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("memshards")
    g = torch.Generator().manual_seed(0)
    table = torch.randn(ROWS, DIM, generator=g)
    save_file({TABLE: table, "model.embed_tokens.weight": torch.zeros(4, 4)}, str(d / "model.safetensors"))
    return d, table


def _step(seed: int, T: int = 7, K: int = 64):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, ROWS, (T, K), generator=g)
    w = torch.softmax(torch.randn(T, K, generator=g), -1)
    return idx, w


class _InProc:
    """A handle-shaped wrapper over an in-process MemoryShard (no Ray)."""

    def __init__(self, shard):
        self.shard, self.lookup = shard, self

    def remote(self, i, w):
        out = self.shard.bag(i, w)
        return type("R", (), {"result": lambda self, timeout_s=None: out})()


def test_split_is_uneven_and_covers():
    assert split(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split(5, 1) == [(0, 5)]
    with pytest.raises(ValueError, match="shards"):
        split(2, 3)


@pytest.mark.parametrize("layout", ["columns", "rows"])
@pytest.mark.parametrize("P", [1, 2, 3])
def test_in_process_shards_match_local_store(table_dir, layout, P):
    d, table = table_dir
    shard_memory(d, P, layout)
    specs = load_specs(d, P, layout)[TABLE]
    assert [(s.begin, s.end) for s in specs] == split(ROWS if layout == "rows" else DIM, P)
    store = RemoteValueStore.from_specs(specs, [_InProc(MemoryShard(s.to_dict())) for s in specs])
    local = TensorValueStore(table)
    for seed in range(3):
        idx, w = _step(seed)
        out = store.submit(idx, w).result()
        ref = local.lookup(idx, w)
        f64 = (table.double()[idx] * w.double()[..., None]).sum(1)
        assert out.dtype == torch.float32 and out.shape == (idx.shape[0], DIM)
        assert torch.allclose(out.double(), f64, rtol=1e-5, atol=1e-5)
        if layout == "columns" or P == 1:
            assert torch.equal(out, ref), "columns layout must be bit-exact with the local store"
        else:  # rows: partial sums re-associate the fp32 sum (documented tolerance)
            assert (out - ref).abs().max().item() <= 1e-5
    assert store.index_dtype == np.int32 and store.bytes_sent == 3 * P * (7 * 64 * 8)


@pytest.mark.parametrize("layout", ["columns", "rows"])
def test_int8_table_shards_carry_scales(tmp_path, layout):
    """An I8 table + per-row scales: each shard gets its rows' scales and dequantizes in its bag; the
    sharded store equals the local int8 store (columns bit-exact) and the float64 bag of q * scale."""
    from memserve.kernels import quantize_rows_int8
    from safetensors.torch import save_file

    q, sc = quantize_rows_int8(torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(4)))
    save_file({TABLE: q, "model.memory_values.scales": sc}, str(tmp_path / "model-00002-of-00002.safetensors"))
    shard_memory(tmp_path, 2, layout)
    specs = load_specs(tmp_path, 2, layout)[TABLE]
    assert all(s.dtype == "I8" and s.scales_path for s in specs)
    shards = [MemoryShard(s.to_dict()) for s in specs]
    rows_held = [s.scales.shape[0] for s in shards]
    assert rows_held == ([ROWS, ROWS] if layout == "columns" else [e - b for b, e in split(ROWS, 2)])
    store = RemoteValueStore.from_specs(specs, [_InProc(s) for s in shards])
    assert store.dtype == "int8" and store.nbytes == ROWS * DIM + ROWS * 4
    local = TensorValueStore(q, sc)
    idx, w = _step(5)
    out, ref = store.submit(idx, w).result(), local.lookup(idx, w)
    f64 = ((q.double() * sc.double()[:, None])[idx] * w.double()[..., None]).sum(1)
    assert torch.allclose(out.double(), f64, rtol=1e-5, atol=1e-5)
    if layout == "columns":
        assert torch.equal(out, ref)
    else:
        assert (out - ref).abs().max().item() <= 1e-5
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    save_file({TABLE: q}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="int8 value table .* has no model.memory_values.scales"):
        shard_memory(tmp_path, 2, layout)


def test_shard_file_errors(tmp_path):
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="no memory-layer value table"):
        shard_memory(tmp_path, 2)
    with pytest.raises(FileNotFoundError, match="memserve shard-memory"):
        load_specs(tmp_path, 2, "columns")
    with pytest.raises(ValueError, match="layout"):
        shard_memory(tmp_path, 2, "diagonal")


# ---- real Ray Serve ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def serve_shards(table_dir):
    ray = pytest.importorskip("ray")
    from memserve.deploy.memory_shards import shard_deployment
    from ray import serve

    d, table = table_dir
    with local_ray():
        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        plans = {}
        for layout, P in (("columns", 3), ("rows", 2)):
            shard_memory(d, P, layout)
            specs = load_specs(d, P, layout)[TABLE]
            handles = [serve.run(shard_deployment(s), name=s.name, route_prefix=None, blocking=False) for s in specs]
            plans[layout] = (specs, handles)
        for _specs, handles in plans.values():
            for h in handles:
                h.info.remote().result(timeout_s=120)
        yield {"plans": plans, "table": table, "ray": ray, "serve": serve, "dir": d}


def _store(ctx, layout, **kw):
    specs, handles = ctx["plans"][layout]
    return RemoteValueStore.from_specs(specs, handles, **kw)


@pytest.mark.parametrize("layout", ["columns", "rows"])
def test_serve_shards_match_local_store(serve_shards, layout):
    store, local = _store(serve_shards, layout), TensorValueStore(serve_shards["table"])
    pending = [(store.submit(*_step(s)), _step(s)) for s in range(4)]  # several layer-steps in flight at once
    for fut, (idx, w) in pending:
        out, ref = fut.result(), local.lookup(idx, w)
        if layout == "columns":
            assert torch.equal(out, ref)
        else:
            assert (out - ref).abs().max().item() <= 1e-5


def test_shard_resident_memory_is_its_slice(serve_shards):
    specs, handles = serve_shards["plans"]["columns"]
    store = _store(serve_shards, "columns")
    every_row = torch.arange(ROWS).view(-1, 64)
    store.lookup(every_row, torch.full(every_row.shape, 1.0))  # every shard touches every row of its slice
    table_bytes = ROWS * DIM * 4
    for s, h in zip(specs, handles, strict=True):
        info = h.info.remote().result(timeout_s=30)
        assert info["slice_bytes"] == ROWS * (s.end - s.begin) * 4
        # resident pages of the shard's file: its slice (page-rounded), never the whole table
        assert 0.95 * info["slice_bytes"] <= info["mapped_rss_bytes"] <= info["slice_bytes"] + (64 << 10)
        assert info["mapped_rss_bytes"] < 0.4 * table_bytes
        print(f"shard {s.name}: slice {info['slice_bytes']} B, resident {info['mapped_rss_bytes']} B "
              f"(table {table_bytes} B, P=3), process RSS {info['rss_bytes'] >> 20} MiB")


def _load(store, local, stop, errors, done):
    seed = 100
    while not stop.is_set():
        idx, w = _step(seed)
        try:
            out = store.lookup(idx, w)
            if not torch.equal(out, local.lookup(idx, w)):
                errors.append(f"step {seed}: rows differ")
        except Exception as e:  # noqa: BLE001 - counted as a failed request
            errors.append(repr(e))
        done.append(seed)
        seed += 1


def _running(serve, app, dep):
    st = serve.status().applications.get(app)
    return 0 if st is None else int(st.deployments[dep].replica_states.get("RUNNING", 0))


@pytest.mark.slow  # waits for Serve to start/replace replicas: most of this module's minutes
def test_scale_shard_replicas_1_2_1_under_load(serve_shards):
    from memserve.deploy.memory_shards import shard_deployment

    serve = serve_shards["serve"]
    specs, _ = serve_shards["plans"]["columns"]
    store, local = _store(serve_shards, "columns"), TensorValueStore(serve_shards["table"])
    s = specs[1]
    stop, errors, done = threading.Event(), [], []
    t = threading.Thread(target=_load, args=(store, local, stop, errors, done), daemon=True)
    t.start()
    try:
        for n in (2, 1):
            serve.run(shard_deployment(s, replicas=(n, n)), name=s.name, route_prefix=None, blocking=False)
            wait_for(lambda n=n: _running(serve, s.name, s.name) == n and
                     serve.status().applications[s.name].status == "RUNNING", 120, f"{n} replicas of {s.name}")
            k = len(done)
            wait_for(lambda k=k: len(done) >= k + 5, 60, "lookups after scaling")
    finally:
        stop.set()
        t.join(timeout=60)
    assert not errors, errors[:3]
    assert len(done) >= 10


def _replica_actors(ray, app):
    from ray.util import list_named_actors

    return [a["name"] for a in list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#")]


@pytest.mark.slow  # waits for Serve to start/replace replicas: most of this module's minutes
def test_killed_shard_replica_is_retried_with_identical_rows(serve_shards):
    ray = serve_shards["ray"]
    specs, _ = serve_shards["plans"]["columns"]
    store, local = _store(serve_shards, "columns", retry_timeout_s=90), TensorValueStore(serve_shards["table"])
    victim = specs[0].name
    stop, errors, done = threading.Event(), [], []
    t = threading.Thread(target=_load, args=(store, local, stop, errors, done), daemon=True)
    t.start()
    try:
        wait_for(lambda: len(done) >= 5, 60, "lookups before the kill")
        names = _replica_actors(ray, victim)
        assert len(names) == 1, names
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        k = len(done)
        wait_for(lambda: _replica_actors(ray, victim) not in ([], names), 120, "a replacement replica")
        wait_for(lambda: len(done) >= k + 5, 120, "lookups after the restart")
    finally:
        stop.set()
        t.join(timeout=120)
    assert not errors, errors[:3]


def test_shard_that_stays_down_is_unavailable_with_its_name(serve_shards):
    serve = serve_shards["serve"]
    specs, _ = serve_shards["plans"]["rows"]
    store = _store(serve_shards, "rows", retry_timeout_s=3.0, call_timeout_s=1.0)
    store.lookup(*_step(1))  # up
    gone = specs[1].name
    serve.delete(gone, _blocking=True)
    t0 = time.monotonic()
    with pytest.raises(MemoryShardUnavailableError, match=gone) as ei:
        store.lookup(*_step(2))
    assert ei.value.shard == gone
    assert time.monotonic() - t0 < 15
