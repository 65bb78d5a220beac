"""Per-shard resident memory of MemoryShard deployments is table / P (issue 17, "Show": measured).

A 128 MiB fp32 value table (131072 slots x 256 columns; 256 and 131072 do not divide by 3, so the
P = 3 splits are uneven) is cut into P = 1, 2, 3 column shards (and P = 3 row shards), each shard a
real MemoryShard Serve deployment. After a lookup sweep over every slot (each shard then has touched
every row of its slice), each shard process reports, from its own /proc/self/smaps, the resident
bytes of its shard file's mapping, and its whole-process RSS before and after the sweep. Expected:
mapped resident = its slice (page-rounded) = table / P, never the whole table; the process grows by
about that much and no more (the sweep's temporaries are small next to a slice).

One P at a time is deployed and deleted, so at most 3 shard processes live at once (shared box).
Run under `flock /tmp/memserve-ray.lock` (it starts Ray).
"""

from __future__ import annotations

import gc

import pytest
import torch
from memserve.deploy.memory_shards import load_specs, mmap_tensor, shard_memory, split
from memserve.deploy.remote_value_store import RemoteValueStore
from memserve.runtime.memory_layers import TensorValueStore
from serving_testlib import local_ray, wait_for

TABLE = "model.memory_values.weight"
ROWS, DIM = 131072, 256  # 128 MiB fp32
TABLE_BYTES = ROWS * DIM * 4
K = 64  # slots per token in the sweep: T = 256 tokens x 64 slots = 16384 slots per call
PAGE_SLACK = 64 << 10  # page rounding at the slice's two ends + the safetensors header page


@pytest.fixture(scope="module")
def big_table(tmp_path_factory):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("shard_rss")
    g = torch.Generator().manual_seed(1)
    table = torch.randn(ROWS, DIM, generator=g)
    save_file({TABLE: table, "model.embed_tokens.weight": torch.zeros(4, 4)}, str(d / "model.safetensors"))
    del table
    gc.collect()
    return d


@pytest.fixture(scope="module")
def serve_ctx():
    pytest.importorskip("ray")
    from ray import serve

    with local_ray():
        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        yield serve


def _sweep(store, local=None, tokens=256):
    """Every slot once, in order, `tokens` x K slots per lookup; checks rows against `local` if given."""
    every = torch.arange(ROWS).view(-1, K)
    for a in range(0, every.shape[0], tokens):
        idx = every[a:a + tokens]
        w = torch.full(idx.shape, 1.0 / K)
        out = store.lookup(idx, w)
        if local is not None:
            assert torch.equal(out, local.lookup(idx, w)), f"rows differ at tokens {a}..{a + tokens}"


@pytest.mark.slow  # starts 9 shard replicas one P at a time (~1 min on 2 cores); CI runs it
@pytest.mark.parametrize(("layout", "P"), [("columns", 1), ("columns", 2), ("columns", 3), ("rows", 3)])
def test_shard_resident_memory_is_table_over_p(big_table, serve_ctx, layout, P):
    from memserve.deploy.memory_shards import shard_deployment

    serve = serve_ctx
    shard_memory(big_table, P, layout)
    specs = load_specs(big_table, P, layout)[TABLE]
    handles = [serve.run(shard_deployment(s), name=s.name, route_prefix=None, blocking=False) for s in specs]
    try:
        for h in handles:
            h.info.remote().result(timeout_s=120)
        store = RemoteValueStore.from_specs(specs, handles)
        # warm-up: one lookup of slot 0 (first-call costs: lazy imports, fbgemm/thread-pool set-up,
        # measured ~25 MiB, are not the slice) before the "before" reading
        store.lookup(torch.zeros(1, K, dtype=torch.long), torch.ones(1, K))
        before = [h.info.remote().result(timeout_s=30) for h in handles]
        local = None
        if layout == "columns":  # the in-engine store on the same (memory-mapped) checkpoint: bit-exact
            local = TensorValueStore(mmap_tensor(big_table / "model.safetensors", TABLE))
        _sweep(store, local)
        after = [h.info.remote().result(timeout_s=30) for h in handles]
    finally:  # delete the P apps together: one blocking delete waits ~30 s each on this Serve
        for s in specs:
            serve.delete(s.name, _blocking=False)
        wait_for(lambda: not set(serve.status().applications) & {s.name for s in specs}, 120, "shard apps deleted")
    n = ROWS if layout == "rows" else DIM
    assert [(s.begin, s.end) for s in specs] == split(n, P)
    for s, b, a in zip(specs, before, after, strict=True):
        slice_bytes = TABLE_BYTES * (s.end - s.begin) // n
        assert a["slice_bytes"] == slice_bytes
        assert a["lookups"] - b["lookups"] == ROWS // K // 256
        assert b["mapped_rss_bytes"] <= PAGE_SLACK, "start-up + one row must read (almost) nothing of the slice"
        # the measured claim: resident pages of the shard's file = its slice = table / P (page-rounded)
        assert 0.98 * slice_bytes <= a["mapped_rss_bytes"] <= slice_bytes + PAGE_SLACK
        assert abs(a["mapped_rss_bytes"] - TABLE_BYTES / P) <= 0.02 * TABLE_BYTES / P + PAGE_SLACK
        grew = a["rss_bytes"] - b["rss_bytes"]
        assert grew <= slice_bytes + (32 << 20), f"{s.name}: process grew {grew >> 20} MiB for a " \
                                                 f"{slice_bytes >> 20} MiB slice"
        print(f"P={P} {layout} {s.name}: slice {slice_bytes / 2**20:.1f} MiB, file resident "
              f"{a['mapped_rss_bytes'] / 2**20:.1f} MiB (table/P = {TABLE_BYTES / P / 2**20:.1f} MiB), "
              f"process RSS {b['rss_bytes'] / 2**20:.0f} -> {a['rss_bytes'] / 2**20:.0f} MiB")
