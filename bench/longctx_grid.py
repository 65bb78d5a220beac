"""Issue 15 grid: filler family x task x length x depth x seed, dense as the ceiling, memory past the window.

    flock /tmp/memserve-bench.lock env OMP_NUM_THREADS=2 .venv/bin/python bench/longctx_grid.py \
        --families prose,stdlib --task single_number --dense-lengths 4k,8k,16k --memory-lengths 16k \
        --depths 0.1,0.5,0.9 --seeds 0,1 --threads 2 --out bench/results/longctx_grid

* dense at lengths <= 8k is the ceiling (plus a 16k column to show dense fails past the window);
* the memory (memserve defaults, --compression) at 16k/32k/64k.
A memory cell whose (family, task, depth, seed) dense fails at the ceiling length (the largest dense length
<= 8k) is reported as "beyond the model" and not counted against the memory: the table gives the memory's
accuracy over all cells and over the cells dense answers ("vs ceiling"). Rows go to <out>/grid_raw.json after
every cell (a killed run keeps what it did; --resume skips cells already there), so the grid can be run in
short pieces; --report-only rewrites the tables/heatmaps from the raw rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from filler_families import FAMILIES, HELD_OUT, TUNED  # noqa: E402
from long_context_bench import _parse_len  # noqa: E402
from long_context_tasks import FAMILY_TASKS, make_family_sample, prompt_text, score  # noqa: E402

WINDOW = 8192  # SmolLM2-135M's trained context
MAX_NEW = {"multivalue": 48, "variable_tracking": 32, "single_sentence": 16, "long_list": 160}


def _key(r):
    return (r["family"], r["task"], r["method"], r["length"], r["depth"], r["seed"])


def run(a) -> None:
    import torch
    from long_context_bench import engine_for, run_one
    from memserve.runtime.loader import load_checkpoint

    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "grid_raw.json"
    rows = json.loads(raw.read_text()) if a.resume and raw.exists() else []
    done, n_resumed = {_key(r) for r in rows}, len(rows)
    ckpt = load_checkpoint(a.model, progress=False)
    tok = ckpt.tokenizer
    depths = [float(x) for x in a.depths.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    plan = [("dense", _parse_len(x)) for x in a.dense_lengths.split(",") if x] + \
           [(a.compression, _parse_len(x)) for x in a.memory_lengths.split(",") if x]
    ns = argparse.Namespace(n_local=None, topk=None, kv_config=a.kv_config, chunk=512)
    from memserve.runtime.kv_memory.quant import bytes_per_token_fp16

    fp16_tok = bytes_per_token_fp16(ckpt.config.num_key_value_heads, ckpt.config.head_dim)
    # seconds of the last cell per (method, length), from the resumed rows at first (prefill dominates a cell)
    t_start, last = time.monotonic(), {(r["method"], r["length"]): r["prefill_s"] + 20 for r in rows}
    engines = {}  # one engine per (method, length), built when first needed and kept
    # cell outer and method inner (dense ceiling next to the memory for the same family/depth/seed): a run cut
    # short by --budget-s leaves complete comparisons; seed, depth outer and family inner: every family progresses
    for s in seeds:
        for d in depths:
            for fam in a.families.split(","):
                for method, L in plan:
                    k = (fam, a.task, method, L, d, s)
                    if k in done:
                        continue
                    # (a dense cell cannot resume: the estimate is its last time; every run does at least one cell)
                    if a.budget_s and method == "dense" and len(rows) > n_resumed and \
                            time.monotonic() - t_start + last.get((method, L), 0) > a.budget_s:
                        print(f"--budget-s {a.budget_s}: stopping before {k} (rerun with --resume)", flush=True)
                        return
                    t_cell = time.monotonic()
                    if (method, L) not in engines:
                        engines[(method, L)] = engine_for(ckpt, method, ns, L + 256)
                    sample = make_family_sample(fam, a.task, tok, L, d, s)
                    ids = tok.encode(prompt_text(sample, tok))
                    if method == "dense":
                        res = run_one(engines[(method, L)], method, ids, MAX_NEW.get(a.task, 12))
                    else:
                        res = _memory_cell(engines[(method, L)], ids, MAX_NEW.get(a.task, 12), out / "partial",
                                           "-".join(map(str, k)), t_start + a.budget_s if a.budget_s else None,
                                           Path(a.body_cache) if a.body_cache else None)
                        if res is None:
                            print(f"--budget-s {a.budget_s}: {k} saved part-way (rerun with --resume)", flush=True)
                            return
                    text, ttft, dms, mb, mt = res
                    sc = score(sample, text)
                    rows.append(dict(family=fam, task=a.task, method=method, length=L, tokens=len(ids), depth=d,
                                     seed=s, score=sc, output=text, answers=sample.answers, prefill_s=ttft,
                                     decode_ms=dms, kv_config=a.kv_config,
                                     mem_bytes_per_token=(mb / mt / fp16_tok) if mt else None))
                    print(f"{fam:10s} {method:5s} L={L:6d} d={d:.2f} s={s} score={sc:.2f} prefill={ttft:6.1f}s "
                          f"out={text!r}", flush=True)
                    raw.write_text(json.dumps(rows, indent=1))
                    last[(method, L)] = time.monotonic() - t_cell
    report(rows, out, a)


def _memory_cell(eng, ids: list[int], max_new: int, partial: Path, name: str, deadline: float | None,
                 body_cache: Path | None = None):
    """A memory cell through the engine as a session: the prompt up to its last whole 256-token chunk is ingested
    in engine-step pieces, then the rest (question) is the request that answers. Chunk-aligned pieces prefill
    exactly like one prompt (ingests mark no prompt end; session continuation == one-shot is tested), and a
    cell longer than one bench-lock hold resumes from the session snapshot saved at the deadline.
    With `body_cache` the ingested body's snapshot is kept there and reused by later runs of the same cell
    (settings that act only at the question, e.g. RetrievalPolicy.exact_every, compared on one prefill).
    Returns run_one's tuple, or None when the deadline came first (state saved under `partial`)."""
    from long_context_bench import run_one

    mem, sid = eng.memory, f"cell-{name}"
    cut = (len(ids) - 1) // 256 * 256
    snap = partial / f"{name}.safetensors"
    body = body_cache / f"{name}.safetensors" if body_cache is not None else None
    t0 = time.perf_counter()
    if body is not None and body.exists():
        mem.load_session(str(body), sid)
    elif snap.exists():
        mem.load_session(str(snap), sid)
    if sid in mem.sessions:  # a loaded session keeps its snapshot's config: this run's retrieval policy applies
        pol = mem.sessions.get(sid).memory.cfg.policy  # (one object, shared by its layers)
        for f in dataclasses.fields(pol):
            setattr(pol, f.name, getattr(eng.memory.cfg.policy, f.name))
    done = mem.sessions.get(sid).memory.num_tokens if sid in mem.sessions else 0
    while done < cut:
        piece = min(cut, done + 2048)
        for _ in mem.ingest(sid, ids[done:piece]):
            pass
        done = piece
        if done < cut and deadline is not None and time.monotonic() > deadline:
            partial.mkdir(parents=True, exist_ok=True)
            eng.save_session(sid, str(snap))
            mem.sessions.delete(sid)
            return None
    if body is not None and not body.exists():
        body.parent.mkdir(parents=True, exist_ok=True)
        eng.save_session(sid, str(body))
    body_s = time.perf_counter() - t0
    text, ttft, dms, mb, mt = run_one(eng, "memory", ids[cut:], max_new, session_id=sid)
    mem.sessions.delete(sid)
    snap.unlink(missing_ok=True)
    return text, body_s + ttft, dms, mb, mt  # prefill of this piece of the run (a resumed cell: the last part)


def _fmt(v, n):
    return f"{100 * v:.0f}% ({n})" if n else "-"


def _ceiling(rows) -> dict:
    """(family, depth, seed) -> dense's score at the largest dense length <= WINDOW of that family."""
    out = {}
    for fam in {r["family"] for r in rows}:
        dl = sorted({r["length"] for r in rows if r["family"] == fam and r["method"] == "dense" and r["length"] <= WINDOW})
        out.update({(fam, r["depth"], r["seed"]): r["score"] for r in rows
                    if dl and r["family"] == fam and r["method"] == "dense" and r["length"] == dl[-1]})
    return out


def _split_summary(rows) -> list[str]:
    """TUNED vs HELD-OUT over the families present: each memory (or dense > WINDOW) column against dense's ceiling
    on the same (family, depth, seed) cells. 'kept' = accuracy / ceiling accuracy (the issue's >= 95% target)."""
    ceil = _ceiling(rows)
    lines = ["## Tuned vs held out", "", "| split | method | length | accuracy, all cells (n) | accuracy on cells with a "
             "ceiling (n) | dense ceiling on those cells | kept (accuracy / ceiling) | on cells dense answers | "
             "beyond model |", "|---|---|---|---|---|---|---|---|---|"]
    for split, fams in (("TUNED", TUNED), ("HELD-OUT", HELD_OUT)):
        sr = [r for r in rows if r["family"] in fams]
        for m, L in sorted({(r["method"], r["length"]) for r in sr}, key=lambda x: (x[0] != "dense", x)):
            if m == "dense" and L <= WINDOW:
                continue
            everything = [r for r in sr if r["method"] == m and r["length"] == L]
            c = [r for r in everything if (r["family"], r["depth"], r["seed"]) in ceil]
            all_acc = _fmt(sum(r["score"] for r in everything) / len(everything), len(everything))
            if not c:
                lines.append(f"| {split} | {m} | {L // 1024}k | {all_acc} | - | - | - | - | - |")
                continue
            acc = sum(r["score"] for r in c) / len(c)
            cacc = sum(ceil[(r["family"], r["depth"], r["seed"])] for r in c) / len(c)
            ok = [r for r in c if ceil[(r["family"], r["depth"], r["seed"])] > 0]
            kept = f"{100 * acc / cacc:.0f}%" if cacc else "-"
            lines.append(f"| {split} | {m} | {L // 1024}k | {all_acc} | {_fmt(acc, len(c))} | {_fmt(cacc, len(c))} | {kept} | "
                         f"{_fmt(sum(r['score'] for r in ok) / max(1, len(ok)), len(ok))} | {len(c) - len(ok)} |")
    return lines + [""]


def _cells(fr) -> list[str]:
    """Per (depth, seed): every method/length's score and the start of its answer."""
    cols = sorted({(r["method"], r["length"]) for r in fr}, key=lambda x: (x[0] != "dense", x))
    lines = ["| depth | seed | " + " | ".join(f"{m} {L // 1024}k" for m, L in cols) + " |", "|---|---|" + "---|" * len(cols)]
    by = {(r["method"], r["length"], r["depth"], r["seed"]): r for r in fr}
    for d, s in sorted({(r["depth"], r["seed"]) for r in fr}):
        cells = []
        for m, L in cols:
            r = by.get((m, L, d, s))
            cells.append("" if r is None else f"{r['score']:.0f} `{' '.join(r.get('output', '').split())[:24]}`".replace("|", "/"))
        lines.append(f"| {int(100 * d)}% | {s} | " + " | ".join(cells) + " |")
    return lines


def report(rows, out: Path, a) -> None:
    """One table per family (TUNED / HELD-OUT named), memory cells split by whether dense answers them."""
    lines = [f"# Long-context grid (issue 15): task `{a.task}`", "",
             f"TUNED families: {', '.join(TUNED)}; HELD-OUT: {', '.join(HELD_OUT)}. Dense ceiling = dense at the "
             f"largest length <= {WINDOW}; a memory cell whose depth/seed dense misses there is *beyond the model*.", ""]
    lines += _split_summary([r for r in rows if r["task"] == a.task])
    for fam in [f for f in FAMILIES if any(r["family"] == f for r in rows)]:
        fr = [r for r in rows if r["family"] == fam and r["task"] == a.task]
        split = "TUNED" if fam in TUNED else "HELD-OUT"
        dl = sorted({r["length"] for r in fr if r["method"] == "dense" and r["length"] <= WINDOW})
        ceil = {(r["depth"], r["seed"]): r["score"] for r in fr if r["method"] == "dense" and dl and r["length"] == dl[-1]}
        lines += [f"## {fam} ({split})", "", "| method | length | accuracy (n) | vs dense ceiling (n) | beyond model |",
                  "|---|---|---|---|---|"]
        for m in sorted({r["method"] for r in fr}, key=lambda m: (m != "dense", m)):
            for L in sorted({r["length"] for r in fr if r["method"] == m}):
                c = [r for r in fr if r["method"] == m and r["length"] == L]
                ok = [r for r in c if ceil.get((r["depth"], r["seed"]), 0) > 0]
                beyond = sum(1 for r in c if (r["depth"], r["seed"]) in ceil and ceil[(r["depth"], r["seed"])] == 0)
                vs = "(ceiling)" if m == "dense" and dl and L == dl[-1] else \
                    _fmt(sum(r["score"] for r in ok) / max(1, len(ok)), len(ok))
                lines.append(f"| {m} | {L // 1024}k | {_fmt(sum(r['score'] for r in c) / len(c), len(c))} | {vs} | "
                             f"{beyond if m != 'dense' or L > WINDOW else '-'} |")
        lines += [""] + _cells(fr) + [""]
    lines += ["Command: `" + " ".join(["bench/longctx_grid.py"] + sys.argv[1:]) + "`", ""]
    (out / f"grid_{a.task}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:  # pragma: no cover - matplotlib is part of the bench extra
        return
    for fam in {r["family"] for r in rows}:
        fr = [r for r in rows if r["family"] == fam and r["task"] == a.task]
        cols = sorted({(r["method"] != "dense", r["method"], r["length"]) for r in fr})
        depths = sorted({r["depth"] for r in fr})
        grid = np.full((len(depths), len(cols)), np.nan)
        for i, d in enumerate(depths):
            for j, (_, m, L) in enumerate(cols):
                v = [r["score"] for r in fr if r["depth"] == d and r["method"] == m and r["length"] == L]
                if v:
                    grid[i, j] = sum(v) / len(v)
        fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 2, 0.5 * len(depths) + 1.6))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(cols)), [f"{m}\n{L // 1024}k" for _, m, L in cols])
        ax.set_yticks(range(len(depths)), [f"{int(100 * d)}%" for d in depths])
        ax.set_ylabel("needle depth")
        ax.set_title(f"{fam} ({'tuned' if fam in TUNED else 'held-out'}) -- {a.task}")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / f"grid_{a.task}_{fam}.png", dpi=80)
        plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default="prose,distractor,stdlib")
    ap.add_argument("--task", default="single_number", choices=FAMILY_TASKS)
    ap.add_argument("--dense-lengths", default="4k,8k,16k")
    ap.add_argument("--memory-lengths", default="16k,32k")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--compression", default="int4", choices=("fp16", "int8", "int4"))
    ap.add_argument("--kv-config", default="{}", help="KV-memory overrides as JSON (KVMemoryConfig fields)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "longctx_grid"))
    ap.add_argument("--resume", action="store_true", help="keep <out>/grid_raw.json's rows, skip their cells")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="start no cell that would end past this many seconds (judged by the last cell's time): "
                         "a shared box's bench lock is held in short pieces; rerun with --resume")
    ap.add_argument("--body-cache", default=None,
                    help="keep each memory cell's ingested body snapshot in this folder and reuse it (only for "
                         "--kv-config changes that act at the question, e.g. exact_every; the body must be the same)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--report-from", default=None,
                    help="with --report-only: comma-separated grid_raw.json files of runs in pieces (merged)")
    a = ap.parse_args(argv)
    if a.report_only:
        cells = {}  # a later file's cell replaces an earlier one's
        for p in (a.report_from.split(",") if a.report_from else [str(Path(a.out) / "grid_raw.json")]):
            cells.update({_key(r): r for r in json.loads(Path(p).read_text())})
        return report(list(cells.values()), Path(a.out), a)
    run(a)


if __name__ == "__main__":
    main()
