"""Decode ms/token against context length on the real default model (SmolLM2-135M-Instruct).

    .venv/bin/python bench/kv_memory_decode.py --lengths 1k,4k,8k,16k,32k --threads 2

For each context length the passkey prompt is ingested ONCE into a KV-memory session (that prefill is
the long part), then decode steps are timed on that session for each retrieval variant
(`reselect_every` 1 = fresh block selection every step, as InfLLM; N = selection refreshed every N
steps, the gathered blocks reused in between). Lengths that fit the model's 8k window are also decoded
with the dense paged path (kv_memory off) for the baseline. Ratios are against the shortest length.
Every run decodes `--steps` tokens greedily with ignore_eos; the first token (it closes the prefill)
is not counted. Each figure is the median of `--repeats` rounds over all lengths and columns (this
shared box drifts by 10-30% over minutes; the raw runs are printed as JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_context_bench import _parse_len  # noqa: E402
from long_context_tasks import make_sample, prompt_text  # noqa: E402


def timed_decode(eng, rid: str, prompt, params, session_id=None) -> float:
    """ms per decode step after the first token."""
    eng.add_request(rid, prompt, params, session_id=session_id)
    stamps = []
    while rid in eng.requests:
        eng.step()
        stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[-params.max_tokens + 1]) / (params.max_tokens - 2) * 1000


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="1k,4k,8k,16k,32k")
    ap.add_argument("--reselect", default="1,16",
                    help="reselect_every variants; 'N:off' also turns question-time exact scoring off for that column "
                         "(RetrievalPolicy.exact: the per-model profile's setting against none, same snapshots), "
                         "'N:everyM' sets exact_every M, 'N:pos=P' RetrievalPolicy.positions P (e.g. ordered_question)")
    ap.add_argument("--steps", type=int, default=33)
    ap.add_argument("--compression", default="int4")
    ap.add_argument("--quantization", default="int8",
                    help="model linears: int8 (fbgemm: faster linears, so attention is a larger share of a step -- "
                         "the harder case for the memory/dense ratio) or none (fp32, LLM's default)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs per figure (median)")
    ap.add_argument("--kv-config", default="{}", help='more KV-memory overrides as JSON, e.g. {"chunk_size": 512}')
    ap.add_argument("--snapshot-dir", default=None,
                    help="keep each length's ingested session here and reuse it when present (the long prefill "
                         "runs once, outside a timed run: --ingest-only); default: a temporary directory")
    ap.add_argument("--ingest-only", action="store_true", help="ingest and save the sessions, time nothing")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "kv_memory_decode.md"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from memserve.runtime.engine import LLMEngine
    from memserve.runtime.loader import load_checkpoint
    from memserve.runtime.sampling import SamplingParams

    ckpt = load_checkpoint("default", progress=False)
    tok = ckpt.tokenizer
    quant = None if a.quantization == "none" else a.quantization
    lengths = [_parse_len(x) for x in a.lengths.split(",")]
    variants = a.reselect.split(",")
    mem_eng = LLMEngine(ckpt, progress=False, kv_memory="retrieval", quantization=quant,
                        max_num_batched_tokens=2048, kv_cache_bytes=64 << 20,
                        kv_memory_config={"compression": a.compression, **json.loads(a.kv_config)})
    dense_eng = LLMEngine(ckpt, progress=False, kv_memory="off", quantization=quant, max_num_batched_tokens=2048)
    params = SamplingParams(max_tokens=a.steps, temperature=0.0, ignore_eos=True)
    print("memory config (profile + --kv-config):", mem_eng.memory.cfg, flush=True)
    rows, prompts = [], {}

    # session snapshots (~300 MB at 32k) live in a temporary directory, removed at exit even after an error
    snap_dir = None if a.snapshot_dir else tempfile.TemporaryDirectory(prefix="memserve_decode_")
    if a.snapshot_dir:
        Path(a.snapshot_dir).mkdir(parents=True, exist_ok=True)

    def snapshot(L: int) -> str:
        return f"{a.snapshot_dir or snap_dir.name}/{L}.safetensors"

    for L in lengths:  # ingest each prompt once; every memory run starts from its snapshot
        ids = prompts[L] = tok.encode(prompt_text(make_sample("passkey", tok, L, 0.5, 0), tok))
        if a.snapshot_dir and Path(snapshot(L)).exists():
            rows.append({"length": L, "tokens": len(ids), "prefill_s": None})
            continue
        t0 = time.perf_counter()
        for _ in mem_eng.memory.ingest(f"s{L}", ids[:-1]):
            pass
        rows.append({"length": L, "tokens": len(ids), "prefill_s": time.perf_counter() - t0})
        mem_eng.save_session(f"s{L}", snapshot(L))
        mem_eng.memory.sessions.delete(f"s{L}")
        print(json.dumps(rows[-1]), flush=True)
    if a.ingest_only:
        return
    # rounds over every (length, column): a drift of this shared box (10-30% over minutes) then hits
    # every figure alike instead of whichever length ran during a slow spell
    runs: dict[tuple[int, str], list[float]] = {}
    # the profile's (a loaded session's policy may be the engine's object)
    exact0, every0 = mem_eng.memory.cfg.policy.exact, mem_eng.memory.cfg.policy.exact_every
    positions0 = mem_eng.memory.cfg.policy.positions
    for i in range(a.repeats):
        for L in lengths:
            ids = prompts[L]
            if len(ids) + a.steps <= dense_eng.max_model_len:
                runs.setdefault((L, "dense"), []).append(timed_decode(dense_eng, f"d{L}-{i}", ids, params))
            for r in variants:
                mem_eng.load_session(snapshot(L), f"s{L}")
                pol = mem_eng.memory.sessions.get(f"s{L}").memory.cfg.policy  # shared by its layers
                pol.reselect_every = int(r.split(":")[0])
                pol.exact = "off" if r.endswith(":off") else exact0
                pol.exact_every = int(r.split(":every")[1].split(":")[0]) if ":every" in r else every0
                pol.positions = r.split(":pos=")[1].split(":")[0] if ":pos=" in r else positions0
                runs.setdefault((L, f"reselect{r}"), []).append(
                    timed_decode(mem_eng, f"m{L}-{r}-{i}", ids[-1:], params, session_id=f"s{L}"))
                mem_eng.memory.sessions.delete(f"s{L}")
    if snap_dir is not None:
        snap_dir.cleanup()
    for row in rows:
        mine = {c: v for (L, c), v in runs.items() if L == row["length"]}
        row.update({c: statistics.median(v) for c, v in mine.items()})
        print(json.dumps({**{k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()},
                          "runs": {c: [round(x, 1) for x in v] for c, v in mine.items()}}), flush=True)

    base = rows[0]
    cols = ["dense"] + [f"reselect{r}" for r in variants]
    lines = [f"Decode ms/token vs context, SmolLM2-135M (linears {a.quantization}), KV memory {a.compression}, "
             f"{a.threads} threads, median of {a.repeats} rounds over every cell", "",
             "| context tokens | dense paged | " + " | ".join(f"memory, reselect every {r.split(':')[0]}"
                                                        + (", exact scoring off" if r.endswith(":off") else "")
                                                        + (f", exact_every {r.split(':every')[1]}" if ":every" in r else "")
                                                        for r in variants)
             + " | memory / dense at the shortest length |", "|---|" + "---|" * (len(cols) + 1)]
    for row in rows:
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append("-" if v is None else f"{v:.1f} ({v / base[c]:.2f}x)" if c in base else f"{v:.1f}")
        rel = " / ".join(f"{row[c] / base['dense']:.2f}x" for c in cols[1:] if "dense" in base)
        lines.append(f"| {row['tokens']} | " + " | ".join(cells) + f" | {rel} |")
    lines += ["", "Command: `" + " ".join(["bench/kv_memory_decode.py"] + sys.argv[1:]) + "`", ""]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
