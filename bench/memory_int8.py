"""What int8 value tables cost (issue 16 item 1): int8 rows + per-row fp32 scales vs the fp32 table.

No memory-layer anchor has quantized tables, so this measures the cost instead of citing one:
  1. the bag: relative error ||bag_int8 - bag_fp32|| / ||bag_fp32|| per token, with the weights a
     product-key lookup really produces (pkm_topk of random queries: heads x knn softmax weights),
     for Gaussian rows (what init-memory writes) and heavy-tailed rows (Student-t, df 3: a row with
     an outlier gets a coarse scale, the worst case for per-row absmax);
  2. a tiny random-weight memory model (tests/tiny_models.py, the tests' model) built twice from the
     same seed, fp32 table vs the same table quantized: all-position logits relative error (max |diff|
     / max |logit|) and greedy agreement over prompts.
The peer in both: the same table stored as bf16 (8 mantissa bits, a dtype the loader already takes).

    python bench/memory_int8.py [--prompts 16 --tokens 16]
Accuracy only (no timing): run it under `nice`, no bench lock needed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from memserve.kernels import embedding_bag, pkm_topk, quantize_rows_int8  # noqa: E402


def bag_error(rows: int, v_dim: int, heads: int, knn: int, k_dim: int, dist: str, tokens: int = 256):
    g = torch.Generator().manual_seed(0)
    if dist == "gaussian":
        table = torch.randn(rows, v_dim, generator=g) / v_dim ** 0.5
    else:
        table = torch.distributions.StudentT(3.0).sample((rows, v_dim)) / v_dim ** 0.5
    q8, s = quantize_rows_int8(table)
    n = int(rows ** 0.5)
    keys = torch.randn(heads, 2, n, k_dim // 2, generator=g)
    q = torch.randn(tokens, heads, k_dim, generator=g)
    idx, w = pkm_topk(q, keys, knn)
    ref = embedding_bag(table, idx, w, out_dtype=torch.float32).double()
    out = []
    for got in (embedding_bag(q8, idx, w, scales=s), embedding_bag(table.bfloat16(), idx, w, out_dtype=torch.float32)):
        rel = (got.double() - ref).norm(dim=1) / ref.norm(dim=1)
        out += [rel.mean().item(), rel.max().item()]
    return out


def tiny_model_agreement(n_prompts: int, n_tokens: int, **memory):
    from memserve.runtime import LLM, SamplingParams
    from memserve.runtime.attention import AttentionMetadata
    from tiny_models import make_tiny_memory_model

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        llms = {dt: LLM(str(make_tiny_memory_model(Path(tmp) / str(dt), mode="parallel", seed=3, table_dtype=dt,
                                                   **memory)), progress=False, num_kv_blocks=256)
                for dt in (torch.float32, torch.int8, torch.bfloat16)}
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, 49152, (24,), generator=g).tolist() for _ in range(n_prompts)]
        errs = {"int8": [], "bf16": []}
        for ids in prompts:
            logits = []
            for llm in llms.values():
                eng = llm.engine
                table = eng.allocator.allocate("x", len(ids))
                meta = AttentionMetadata.build(["x"], [len(ids)], [0], [table], eng.allocator.block_size)
                logits.append(eng.model.forward(torch.tensor(ids), meta, eng.attn, None).double())
                eng.allocator.free("x")
            for k, lg in zip(errs, logits[1:]):
                errs[k].append(((lg - logits[0]).abs().max() / logits[0].abs().max()).item())
        params = SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True)
        outs = [[o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] for llm in llms.values()]
        for k, other in zip(errs, outs[1:]):
            prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(outs[0], other)]
            e = errs[k]
            out[k] = {"logits_rel_err_mean": round(sum(e) / len(e), 4), "logits_rel_err_max": round(max(e), 4),
                      "identical_greedy": f"{sum(p == n_tokens for p in prefix)}/{n_prompts}",
                      "tokens_equal": round(sum(a == b for x, y in zip(outs[0], other) for a, b in zip(x, y))
                                            / (n_prompts * n_tokens), 3),
                      "mean_common_prefix": sum(prefix) / len(prefix)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    print("| bag (rows x v_dim, heads x knn) | rows | int8 mean rel. error | int8 max | bf16 mean (peer) | bf16 max |")
    print("|---|---|---|---|---|---|")
    for rows, v_dim, heads, knn in [(65536, 576, 4, 32), (65536, 64, 4, 32), (4096, 576, 1, 8)]:
        for dist in ("gaussian", "student-t3"):
            e = bag_error(rows, v_dim, heads, knn, 64, dist)
            print(f"| {rows} x {v_dim}, {heads} x {knn} | {dist} | " + " | ".join(f"{x:.2e}" for x in e) + " |")
    print()
    for mem in [dict(), dict(n_keys=32, knn=8, heads=2, v_dim=48)]:
        r = tiny_model_agreement(a.prompts, a.tokens, **mem)
        print(f"tiny model {mem or 'defaults (n_keys 8, knn 4, heads 2, v_dim 48)'}: {r}")


if __name__ == "__main__":
    main()
