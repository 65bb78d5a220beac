"""Long-context benchmark harness shared by bench/passkey.py and bench/niah.py.

Grid: context length x needle depth (x samples), for every method in the same run:
  dense   -- full KV, exact attention (kv_memory off; beyond the model's 8k window RoPE extrapolates)
  stream  -- sinks + local window only (StreamingLLM; memory_topk=0)
  fp16 / int8 / int4 -- memserve retrieval KV memory with that memory-tier compression
Reports accuracy, decode ms/token, memory-tier bytes per token (relative to fp16 KV), a markdown
table and one heatmap PNG per method under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_context_tasks import TASKS, make_sample, prompt_text, score  # noqa: E402

METHODS = ("dense", "stream", "fp16", "int8", "int4")
# answer lengths: one 5- or 7-digit number (+ a little), four 7-digit numbers in a list, four names
MAX_NEW = {"passkey": 12, "niah_single": 12, "niah_multikey": 12, "niah_multivalue": 48, "variable_tracking": 32}


def _parse_len(s: str) -> int:
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def engine_for(ckpt, method: str, args, max_len: int):
    from memserve.runtime.engine import LLMEngine

    mem_cfg = {k: v for k, v in (("n_local", args.n_local), ("topk", args.topk)) if v is not None}
    mem_cfg.update(json.loads(args.kv_config))
    if method == "dense":
        per_tok = 2 * ckpt.config.num_hidden_layers * ckpt.config.num_key_value_heads * ckpt.config.head_dim * 4
        return LLMEngine(ckpt, progress=False, kv_memory="off", max_model_len=max_len + 64,
                         kv_cache_bytes=per_tok * (max_len + 1024), max_num_batched_tokens=args.chunk)
    comp = {"stream": "int8"}.get(method, method)
    return LLMEngine(ckpt, progress=False, kv_memory="retrieval", max_num_batched_tokens=4 * args.chunk,
                     kv_cache_bytes=64 << 20, kv_memory_config={**mem_cfg, "compression": comp})


def run_one(eng, method: str, ids: list[int], max_new: int, session_id: str | None = None):
    from memserve.runtime.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_new, temperature=0.0, memory_topk=0 if method == "stream" else None)
    rid = f"r{time.monotonic_ns()}"
    eng.add_request(rid, ids, params, session_id=session_id)
    t0 = time.perf_counter()
    out, mem_bytes, mem_tokens = None, 0, 0
    t_first = None
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == rid:
                out = o
                if t_first is None and o.token_ids:
                    t_first = time.perf_counter()
        if eng.memory is not None and rid in eng.memory.backend.memories:
            m = eng.memory.backend.memories[rid]
            mem_bytes = m.tier_bytes()["memory"]
            mem_tokens = sum(lm.num_blocks for lm in m.layers) * m.cfg.block_size  # token-layers in blocks
    t1 = time.perf_counter()
    n = len(out.token_ids)
    decode_ms = (t1 - t_first) / max(1, n - 1) * 1000 if n > 1 else float("nan")
    return out.text, (t_first or t1) - t0, decode_ms, mem_bytes, mem_tokens


def main(default_task: str, argv=None):
    ap = argparse.ArgumentParser(description=f"{default_task} grid: context length x depth x method")
    ap.add_argument("--task", default=default_task, choices=TASKS)
    ap.add_argument("--lengths", default="2k,4k,8k,16k,32k")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--first-sample", type=int, default=0, help="seed of the first sample (to extend a run)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n-local", type=int, default=None, help="default: KVMemoryConfig's")
    ap.add_argument("--topk", type=int, default=None, help="default: RetrievalPolicy's")
    ap.add_argument("--kv-config", default="{}", help='more KV-memory overrides as JSON, e.g. {"reselect_every": 16}')
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--max-new", type=int, default=None,
                    help="tokens to generate (default: enough for the task's answer, see MAX_NEW)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--model", default="default")
    ap.add_argument("--report-from", default=None,
                    help="comma-separated *_raw.json of earlier runs: write one table + heatmaps of them all "
                         "(no model run; a later file's cell replaces an earlier one's)")
    a = ap.parse_args(argv)
    a.max_new = a.max_new or MAX_NEW[a.task]
    if a.report_from:
        return report_from([Path(x) for x in a.report_from.split(",")], Path(a.out), a)
    if a.threads:
        torch.set_num_threads(a.threads)
    from memserve.runtime.kv_memory.quant import bytes_per_token_fp16
    from memserve.runtime.loader import load_checkpoint

    ckpt = load_checkpoint(a.model, progress=False)
    tok = ckpt.tokenizer
    lengths = [_parse_len(x) for x in a.lengths.split(",")]
    depths = [float(x) for x in a.depths.split(",")]
    methods = a.methods.split(",")
    fp16_tok = bytes_per_token_fp16(ckpt.config.num_key_value_heads, ckpt.config.head_dim)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    tag = f"{a.task}"
    for method in methods:
        eng = engine_for(ckpt, method, a, max(lengths) + 256)
        for L in lengths:
            for d in depths:
                for s in range(a.first_sample, a.first_sample + a.samples):
                    sample = make_sample(a.task, tok, L, d, s)
                    ids = tok.encode(prompt_text(sample, tok))
                    text, ttft, dms, mb, mt = run_one(eng, method, ids, a.max_new)
                    sc = score(sample, text)
                    rows.append(dict(method=method, length=L, tokens=len(ids), depth=d, sample=s, score=sc,
                                     output=text, answers=sample.answers, prefill_s=ttft, decode_ms=dms,
                                     mem_bytes_per_token=(mb / mt / fp16_tok) if mt else None))
                    print(f"{method:6s} L={L:6d} tok={len(ids):6d} depth={d:.2f} s={s} score={sc:.2f} "
                          f"prefill={ttft:7.1f}s decode={dms:6.1f}ms/tok "
                          f"mem/fp16={rows[-1]['mem_bytes_per_token'] or 0:.3f} out={text!r}", flush=True)
                    (out_dir / f"{tag}_raw.json").write_text(json.dumps(rows, indent=1))
        del eng
    write_report(rows, lengths, depths, methods, out_dir, tag, a)


def report_from(paths: list[Path], out_dir: Path, a) -> None:
    """One report over the raw rows of several runs (a grid run in pieces)."""
    cells: dict[tuple, dict] = {}
    for p in paths:
        for r in json.loads(p.read_text()):
            cells[(r["method"], r["length"], r["depth"], r["sample"])] = r
    rows = list(cells.values())
    order = {m: i for i, m in enumerate(METHODS)}
    methods = sorted({r["method"] for r in rows}, key=lambda m: order.get(m, len(order)))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{a.task}_raw.json").write_text(json.dumps(rows, indent=1))
    write_report(rows, sorted({r["length"] for r in rows}), sorted({r["depth"] for r in rows}), methods, out_dir,
                 a.task, a)


def write_report(rows, lengths, depths, methods, out_dir: Path, tag: str, a) -> None:
    lines = [f"# {tag}: accuracy by context length (mean over depths x samples; in brackets: how many)", "",
             "| method | " + " | ".join(f"{L // 1024}k" if L % 1024 == 0 else str(L) for L in lengths)
             + " | decode ms/tok (by length) | memory-tier bytes/token vs fp16 |",
             "|---|" + "---|" * (len(lengths) + 2)]
    for m in methods:
        cells, dec, mb = [], [], []
        for L in lengths:
            r = [x for x in rows if x["method"] == m and x["length"] == L]
            cells.append(f"{100 * sum(x['score'] for x in r) / len(r):.0f}% ({len(r)})" if r else "-")
            ds = [x["decode_ms"] for x in r if x["decode_ms"] == x["decode_ms"]]
            dec.append(f"{sum(ds) / len(ds):.0f}" if ds else "-")
            mb += [x["mem_bytes_per_token"] for x in r if x["mem_bytes_per_token"]]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {' / '.join(dec)} | "
                     + (f"{sum(mb) / len(mb):.3f}" if mb else "-") + " |")
    lines += ["", "Command: `" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) + "`", ""]
    (out_dir / f"{tag}_table.md").write_text("\n".join(lines))
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is part of the bench extra
        return
    for m in methods:
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        for i, d in enumerate(depths):
            for j, L in enumerate(lengths):
                r = [x["score"] for x in rows if x["method"] == m and x["length"] == L and x["depth"] == d]
                if r:
                    grid[i, j] = sum(r) / len(r)
        fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.5 * len(depths) + 1.5))
        im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{L // 1024}k" if L % 1024 == 0 else str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{int(100 * d)}%" for d in depths])
        ax.set_xlabel("context tokens")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{tag} -- {m}")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out_dir / f"{tag}_{m}.png", dpi=80)
        plt.close(fig)
