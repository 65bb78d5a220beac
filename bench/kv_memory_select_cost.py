"""Decode cost of a retrieval setting, attention only: ms per decode token summed over a model's layers,
on one KVLayerStore per layer filled with random keys/values at each context length (SmolLM2-135M's
shape: 9 query heads, 3 KV heads, head_dim 64, 30 layers; int4 memory by default).

    flock /tmp/memserve-bench.lock env OMP_NUM_THREADS=1 .venv/bin/python bench/kv_memory_select_cost.py \\
        --lengths 1k,32k --variants '{}' '{"rerank": 64}'

This times what a setting adds to a decode step (selection, re-ranking, gathering, the softmax), not the
model's linears: compare the added ms/token with the engine's measured ms/token (bench/kv_memory_decode.md).
Random keys make scores flat, so a fresh selection changes many picks: an upper bound on refill cost.
RetrievalPolicy.exact variants also report one exact scoring of every block (the question chunk's, once
per prompt) x layers; their decode rows include the exact rescoring of fresh decode selections (exact_every).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_context_bench import _parse_len  # noqa: E402


def main(argv=None):
    from memserve.runtime.kv_memory import KVLayerStore, default_inv_freq
    from memserve.runtime.kv_memory_backend import make_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="1k,32k")
    ap.add_argument("--variants", nargs="+", default=["{}"], help="KVMemoryConfig / RetrievalPolicy overrides (JSON)")
    ap.add_argument("--compression", default="int4")
    ap.add_argument("--layers", type=int, default=30, help="ms/token is one layer's time x this")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stat", default="median", choices=("median", "min"),
                    help="per-round figure reported; min is the steadier one on a shared box")
    a = ap.parse_args(argv)
    hq, hkv, d = 9, 3, 64
    inv, scale = default_inv_freq(d, 100000.0).float(), d**-0.5
    g = torch.Generator().manual_seed(0)
    rows = {}
    with torch.inference_mode():
        for L in (_parse_len(x) for x in a.lengths.split(",")):
            q, k, v = (torch.randn(L + a.steps, h, d, generator=g) for h in (hq, hkv, hkv))
            for var in a.variants:
                cfg = make_config({"compression": a.compression, **json.loads(var)})
                mem = KVLayerStore(cfg, 0, hkv, d)
                for p in range(0, L, cfg.chunk_size):
                    n = min(cfg.chunk_size, L - p)
                    mem.attend(q[p : p + n], k[p : p + n], v[p : p + n], p, inv, scale)
                times = []
                for _ in range(a.repeats):  # the same steps again from a copy of the state: rounds comparable
                    m = KVLayerStore(cfg, 0, hkv, d)
                    m.load_state({x: y.clone() for x, y in mem.state_tensors().items()})
                    m.hq = hq
                    t0 = time.perf_counter()
                    for p in range(L, L + a.steps):
                        m.attend(q[p : p + 1], k[p : p + 1], v[p : p + 1], p, inv, scale)
                    times.append((time.perf_counter() - t0) / a.steps * 1000 * a.layers)
                stat = statistics.median if a.stat == "median" else min
                rows[(L, var)] = stat(times)
                rec = dict(length=L, variant=var, ms_per_token=times, blocks=mem.num_blocks)
                if cfg.policy.exact != "off":  # the one exact scoring of the question's chunk (x layers), ms
                    from memserve.runtime.kv_memory.quant import exact_block_scores

                    one = []
                    for _ in range(a.repeats):
                        t0 = time.perf_counter()
                        exact_block_scores(mem._stored()[0], q[L], cfg.key_group)
                        one.append((time.perf_counter() - t0) * 1000 * a.layers)
                    rec["exact_scoring_ms"] = one
                    rows[(L, var + " one exact scoring (question chunk)")] = stat(one)
                print(json.dumps(rec), flush=True)
    lengths = sorted({x for x, _ in rows})
    print(f"\nAttention-only decode ms/token (x {a.layers} layers), {a.compression}, "
          f"{torch.get_num_threads()} thread(s), {a.stat} of {a.repeats}\n")
    print("| variant | " + " | ".join(f"{x} tokens" for x in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for var in dict.fromkeys(v for _, v in rows):
        print(f"| `{var}` | " + " | ".join(f"{rows[(x, var)]:.2f}" for x in lengths) + " |")


if __name__ == "__main__":
    main()
