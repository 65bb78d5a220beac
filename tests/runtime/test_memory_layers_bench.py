"""bench/memory_layers.py end to end on a tiny model (--quick): bag table, decode table, plot, JSON."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.slow  # 4-5 s on a quiet 2-core box, 19-20 s measured with this box at load 6-8
def test_memory_layers_bench_quick(tiny_llama_dir, tmp_path):
    import memory_layers as bench  # bench/memory_layers.py (no package of that name exists)

    out = tmp_path / "results"
    argv = ["--quick", "--threads", "1", "--base", str(tiny_llama_dir), "--layers", "0,2", "--n-keys", "16",
            "--heads", "2", "--knn", "4", "--k-dim", "16", "--sizes-mb", "2", "--streams", "1,3",
            "--model-cache", str(tmp_path / "models"), "--out", str(out)]
    assert bench.main(argv) == 0
    res = json.loads((out / "memory_layers.json").read_text())
    assert {r["dtype"] for r in res["bag"]} == {"float32", "bfloat16", "int8"}
    for r in res["bag"]:
        # same rows, same weights: memserve's bag and torch's peer agree (bf16 peer rounds its output)
        assert r["max_rel_diff"] < (1e-2 if r["dtype"] == "bfloat16" else 1e-5), r
        assert r["ours_s"] > 0 and r["peer_s"] > 0 and r["K"] == 8
    dec = res["decode"]
    assert dec["slots"] == 256 and dec["shared"] and dec["layers"] == [0, 2]
    assert dec["greedy_identical"]  # value_proj = 0: the memory model emits the base's tokens
    assert set(dec) >= {"streams_1", "streams_3"} and all(dec[k]["ratio"] > 0 for k in ("streams_1", "streams_3"))
    md = (out / "memory_layers.md").read_text()
    assert "| 2 MB | int8 |" in md and "memory / base" in md
    assert (out / "memory_layers.png").stat().st_size > 1000
