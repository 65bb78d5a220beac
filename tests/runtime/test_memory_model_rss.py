"""Loading a memory model with a 1 GiB value table raises resident memory by < 10% of the table (issue 16
'show'): the loader memory-maps the table, and a lookup touches only the pages of the rows it reads.

The table is written to tmp by streaming 64 MiB chunks (never held in RAM); the load runs in a fresh
process so its RSS is not the pytest process's history. Can fail: the same process then copies a
quarter of the rows into RAM (what a loader that reads the table does), and its RSS must grow by that
quarter. Measured (shared 2-core box): +9.3 MiB at load; +38-89 MiB after generating 4 tokens, almost
all first-inference allocations (the table's own resident pages: 6.5-64 MiB, see below)."""

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import make_tiny_memory_model  # noqa: E402

N_KEYS, V_DIM = 512, 1024  # 262,144 rows x 1024 fp32 = 1 GiB
TABLE = "model.memory_values.weight"
GiB = 1 << 30

PROBE = textwrap.dedent("""
    import json, os, sys
    import torch
    from memserve.deploy.memory_shards import mapped_rss_bytes
    from memserve.runtime import LLM, SamplingParams

    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

    torch.set_num_threads(1)
    before = rss()
    llm = LLM(sys.argv[1], progress=False, num_kv_blocks=16)
    loaded = rss()
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    generated = rss()
    table_file = os.path.realpath(sys.argv[1] + "/model-00002-of-00002.safetensors")
    table_resident = mapped_rss_bytes(table_file)  # the table's own resident pages (smaps)
    store = llm.engine.model.value_stores()["model.memory_values.weight"]
    t = store.table
    copy = t[: t.shape[0] // 4].clone()  # what a loader that reads the table would do, for a quarter of it
    touched = rss()
    s = float(copy[0, 0])
    print(json.dumps({"before": before, "loaded": loaded, "generated": generated, "touched": touched,
                      "table_resident": table_resident, "table_resident_touched": mapped_rss_bytes(table_file),
                      "tokens": len(out[0].token_ids), "nbytes": store.nbytes, "sum": s}))
""")


def _write_big_table(path: Path) -> None:
    rows = N_KEYS * N_KEYS
    nbytes = rows * V_DIM * 4
    hdr = json.dumps({TABLE: {"dtype": "F32", "shape": [rows, V_DIM], "data_offsets": [0, nbytes]},
                      "__metadata__": {"format": "pt"}}).encode()
    hdr += b" " * (-len(hdr) % 8)
    g = torch.Generator().manual_seed(0)
    step = 16384  # 64 MiB of rows per write
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)) + hdr)
        for _ in range(0, rows, step):
            f.write(torch.randn(step, V_DIM, generator=g).numpy().tobytes())


@pytest.mark.slow  # writes 1 GiB: 68 s wall / ~15 s CPU on the shared 2-core box
def test_loading_a_1gib_table_raises_rss_by_under_10_percent(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    if free < 3 * GiB:
        pytest.skip(f"needs 3 GiB free in {tmp_path} for the 1 GiB table (has {free / GiB:.1f} GiB)")
    from safetensors.torch import load_file, save_file

    d = make_tiny_memory_model(tmp_path / "m", mode="parallel", n_keys=8, v_dim=V_DIM, heads=1, knn=8, k_dim=16,
                               with_tokenizer=False)
    cfg = json.loads((d / "config.json").read_text())
    cfg["memory_layers"]["n_keys"] = N_KEYS
    (d / "config.json").write_text(json.dumps(cfg))
    dense = load_file(str(d / "model-00001-of-00002.safetensors"))
    g = torch.Generator().manual_seed(1)
    for i in cfg["memory_layers"]["layers"]:  # keys for 512 sub-keys per half
        dense[f"model.layers.{i}.memory.keys"] = 0.5 * torch.randn(1, 2, N_KEYS, 8, generator=g)
    save_file(dense, str(d / "model-00001-of-00002.safetensors"))
    _write_big_table(d / "model-00002-of-00002.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", PROBE, str(d)], env=env, capture_output=True, text=True, timeout=300,
                       cwd=d)  # not the checkout root on the child's sys.path (tests/conftest.py says why)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["nbytes"] == GiB and m["tokens"] == 4
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    print(f"RSS: +{mib(m['loaded'] - m['before'])} at load, +{mib(m['generated'] - m['before'])} after "
          f"generating 4 tokens (table pages resident: {mib(m['table_resident'])}), +{mib(m['touched'] - m['before'])} "
          f"after copying 1/4 of the table (table pages: {mib(m['table_resident_touched'])})")
    assert m["loaded"] - m["before"] < 0.10 * GiB, m  # the load maps, reads nothing
    # lookups map only pages around the rows they read: measured 6.5 MiB (table just written, in the page
    # cache) and 64.0 MiB (after memory pressure evicted it; readahead) for ~110 rows; MADV_RANDOM on the
    # mapping did not change the 64 MiB (tried, not kept)
    assert m["table_resident"] < 0.10 * GiB, m
    # the process also grows by ~80 MiB of first-inference allocations (not the table): reported, bounded loosely
    assert m["generated"] - m["before"] < 0.25 * GiB, m
    # can fail: a copy of a quarter of the table (a loader reading it into RAM) shows up in RSS. (Reading
    # mapped pages shows up too, but on this shared box the kernel reclaims clean file pages under memory
    # pressure: measured 334 MiB and 100 MiB of table pages resident after reading the same quarter.)
    assert m["touched"] - m["generated"] > 0.24 * GiB, m
