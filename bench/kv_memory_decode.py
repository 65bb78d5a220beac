"""Decode cost of the KV memory against context length, on SmolLM2-135M's shapes (30 layers, 9 query /
3 KV heads, head_dim 64), with random keys/values (the attention path only: the model's linears cost
the same at every context length).

    .venv/bin/python bench/kv_memory_decode.py --lengths 1k,4k,8k,16k,32k --steps 20

Prints ms per decode token for: the KV memory (all 30 layers: selection, LRU retrieval, attention) and
dense SDPA over the whole context (what the paged dense path computes), plus memory-tier bytes per
token relative to fp16 KV. `--model-ms` adds the measured full-model decode time at 1k to express the
end-to-end ratio 32k / 1k.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memserve.runtime.kv_memory import KVMemoryConfig, SequenceMemory, default_inv_freq  # noqa: E402
from memserve.runtime.kv_memory_backend import make_config  # noqa: E402
from memserve.runtime.kv_memory_quant import bytes_per_token_fp16  # noqa: E402

LAYERS, HQ, HKV, D = 30, 9, 3, 64


def _parse_len(s):
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def fill(cfg: KVMemoryConfig, n: int, chunk: int, g) -> SequenceMemory:
    mem = SequenceMemory(cfg, LAYERS, HKV, D)
    inv = default_inv_freq(D, 1e5)
    p = 0
    while p < n:
        t = min(chunk, n - p)
        q = torch.randn(t, HQ, D, generator=g)
        k = torch.randn(t, HKV, D, generator=g)
        v = torch.randn(t, HKV, D, generator=g)
        for lm in mem.layers:  # same inputs in every layer: only the cost matters here
            lm.attend(q, k, v, p, inv, D**-0.5)
        p += t
    return mem


def decode_ms(mem: SequenceMemory, steps: int, g) -> float:
    inv = default_inv_freq(D, 1e5)
    p = mem.num_tokens
    qs = torch.randn(steps, 1, HQ, D, generator=g)
    ks = torch.randn(steps, 1, HKV, D, generator=g)
    t0 = time.perf_counter()
    for i in range(steps):
        for lm in mem.layers:
            lm.attend(qs[i], ks[i], ks[i], p + i, inv, D**-0.5)
    return (time.perf_counter() - t0) / steps * 1000


def dense_ms(n: int, steps: int, g) -> float:
    k = torch.randn(1, HKV, n, D, generator=g)
    q = torch.randn(1, HQ, 1, D, generator=g)
    t0 = time.perf_counter()
    for _ in range(steps):
        for _ in range(LAYERS):
            torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    return (time.perf_counter() - t0) / steps * 1000


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1k,4k,8k,16k,32k")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--config", default="{}", help="KVMemoryConfig overrides as JSON")
    ap.add_argument("--model-ms", type=float, default=0.0, help="measured full-model decode ms/token at 1k")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import json

    torch.set_num_threads(a.threads)
    cfg = make_config(json.loads(a.config))
    g = torch.Generator().manual_seed(0)
    fp16 = bytes_per_token_fp16(HKV, D)
    print(f"config: n_init={cfg.n_init} n_local={cfg.n_local} block={cfg.block_size} topk={cfg.policy.topk} "
          f"compression={cfg.compression} granularity={cfg.policy.granularity}")
    print("| context | memory ms/tok | dense SDPA ms/tok | memory-tier bytes/token vs fp16 | device tier MB |")
    print("|---|---|---|---|---|")
    base = None
    with torch.inference_mode():
        for L in [_parse_len(x) for x in a.lengths.split(",")]:
            mem = fill(cfg, L, 512, g)
            decode_ms(mem, 2, g)  # warm the LRU
            ms = decode_ms(mem, a.steps, g)
            dm = dense_ms(L, a.steps, g)
            tb = mem.tier_bytes()
            blocks_tok = sum(lm.num_blocks for lm in mem.layers) * cfg.block_size
            ratio = tb["memory"] / blocks_tok / fp16 if blocks_tok else float("nan")
            base = base if base is not None else ms
            e2e = f" (end-to-end vs first: {(a.model_ms + ms) / (a.model_ms + base):.2f}x)" if a.model_ms else ""
            print(f"| {L} | {ms:.1f}{e2e} | {dm:.1f} | {ratio:.3f} | {tb['device'] / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
    main()
