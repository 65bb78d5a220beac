"""Issue 15 item 3: how the needle block ranks under EXACT block scoring, per layer and query / KV head, at
the selections that decide the answer -- replayed through the engine on bodies `bench/longctx_grid.py
--body-cache` ingested, under question-time RetrievalPolicy variants.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python bench/kv_memory_rank.py --families prose,code_logs \\
        --depths 0.5,0.9 --body-cache /tmp/bodies --variants '{}' '{"exact_query": "last"}' \\
        --out bench/results/longctx_grid/rank

For each cell (family, depth; task single_number, 16k, seed 0, int4 memory: the grid's names) and variant
(RetrievalPolicy overrides as JSON, applied to the loaded session as the grid does) the question runs as the
request continuing the session. Every layer's selection is wrapped: before it, the blocks are scored exactly
(max q.k over each block's stored keys, `exact_block_scores`) with two query statistics of the step -- the
chunk's mean query (what the profile uses) and its last token's query (the one whose logits give the answer's
first token; equal for a decode step) -- and the needle blocks' ranks are kept per query head, per KV head
(summed over its query heads, as kv_head selection ranks) and per KV head taking the max over its query heads;
after it, whether the step's working set holds them. Output: <out>/rank.jsonl (a row per cell and variant,
with every step) and <out>/scores_<cell>.pt (the question chunk's and the first decode step's raw (Hq, NB)
scores of every layer, for selection rules simulated offline).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_context_bench import _parse_len, engine_for, run_one  # noqa: E402
from long_context_tasks import make_family_sample, prompt_text, score  # noqa: E402

MAX_NEW = 12


def needle_span(sample, tok, full: str) -> tuple[int, int]:
    """Token positions [first token of the needle sentence, last token of its answer + 1)."""
    content = sample.messages[0]["content"]
    n0 = full.index(content) + sample.meta["needle_offsets"][0]
    a_end = full.index(sample.answers[0], n0) + len(sample.answers[0])
    return len(tok.encode(full[:n0])), len(tok.encode(full[:a_end]))


def _ranks(s: torch.Tensor, blocks: list[int], hkv: int) -> dict:
    """Ranks (0 = best) of `blocks` under scores s (Hq, NB): per query head, per KV head by the sum over its
    group (kv_head selection), per KV head by the max over its group."""
    g = s.shape[0] // hkv
    grp = s.view(hkv, g, -1)
    out = {}
    for name, agg in (("q", s), ("kv_sum", grp.sum(1)), ("kv_max", grp.amax(1))):
        out[name] = [[int((agg[h] > agg[h, b]).sum()) for h in range(agg.shape[0])] for b in blocks]
    return out


class RankRecorder:
    """Wraps every layer store's `_retrieve` of one memory (see the module docstring)."""

    def __init__(self, mem, span: tuple[int, int]):
        from memserve.runtime.kv_memory.quant import exact_block_scores

        self.steps, self.raw, self.span, self.current = [], [], span, None
        self._exact = exact_block_scores
        for lm in mem.layers:
            orig = lm._retrieve

            def wrapped(q_glob, repr_scores=None, lm=lm, orig=orig):
                rec = self._before(lm, q_glob)
                res = orig(q_glob, repr_scores)
                self._after(lm, rec, q_glob.shape[0])
                return res

            lm._retrieve = wrapped

    def begin(self, label: str) -> None:
        self.current = []
        self.steps.append(dict(step=label, layers=self.current))
        self.raw.append({})

    def _blocks(self, lm) -> list[int]:
        bp, bs = lm.block_pos.get(), lm.cfg.block_size
        a, b = self.span
        return ((bp < b) & (bp + bs > a)).nonzero().flatten().tolist()

    def _before(self, lm, q_glob) -> dict:
        if self.current is None:
            self.begin("?")
        kq = lm._stored()[0]
        blocks = self._blocks(lm)
        rec = dict(layer=lm.layer, nb=lm.num_blocks, t=q_glob.shape[0], blocks=blocks)
        for name, q in (("mean", q_glob.mean(0)), ("last", q_glob[-1])):
            s = self._exact(kq, q.float(), lm.cfg.key_group)
            self.raw[-1].setdefault(name, []).append(s.half())
            rec[name] = _ranks(s, blocks, lm.hkv)
            if q_glob.shape[0] == 1:
                break  # a decode step: one query
        self.current.append(rec)
        return rec

    def _after(self, lm, rec: dict, t: int) -> None:
        hkv = lm.hkv
        if t > 1:
            m = lm.sticky
            sel = None if m is None else m.view(hkv, -1, m.shape[1])[:, 0]
        else:
            slots = lm.dec_slots
            sel = None
            if slots is not None:
                sel = torch.zeros(slots.shape[0], lm.num_blocks + 1, dtype=torch.bool)
                sel.scatter_(1, torch.where(slots >= 0, slots, lm.num_blocks), True)
                sel = sel.view(hkv, slots.shape[0] // hkv, -1).any(1)
        rec["selected"] = None if sel is None else [[bool(sel[h, b]) for h in range(hkv)] for b in rec["blocks"]]
        rec["n_selected"] = None if sel is None else int(sel[:, : lm.num_blocks].sum(1).max())


def analyze(paths: list[str], k: int = 16, hkv: int = 3) -> str:
    """Offline, from scores_*.pt: per cell and selection rule, at the question chunk (step q) and the first
    decode step (step d): in how many of the 30 x Hkv layer-heads the needle's answer block is within the
    top-k, and the per-layer best rank over KV heads."""
    from memserve.runtime.kv_memory.selection import group_scores

    lines = [f"| cell | step | query | reduce | layer-heads with the needle in top-{k} | median rank | "
             "best rank per layer (0..29) |", "|---|---|---|---|---|---|---|"]
    for p in paths:
        d = torch.load(p)
        raws = d["raws"].get("{}") or next(iter(d["raws"].values()))
        for si, step in enumerate(raws[:2]):
            for qname, per_layer in step.items():
                for reduce in ("sum", "max", "z"):
                    ranks, best = [], []
                    for s in per_layer:
                        s = s.float()
                        nb = s.shape[1]
                        blk = d["blocks"][-1]  # the block holding the answer's last token
                        agg = group_scores(s.view(hkv, -1, nb), reduce)
                        r = [int((agg[h] > agg[h, blk]).sum()) for h in range(hkv)]
                        ranks += r
                        best.append(min(r))
                    inside = sum(1 for r in ranks if r < k)
                    med = sorted(ranks)[len(ranks) // 2]
                    lines.append(f"| {Path(p).stem[7:]} | {'qd'[si]} | {qname} | {reduce} | {inside}/{len(ranks)} | "
                                 f"{med} | {' '.join(map(str, best))} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default="prose,code_logs")
    ap.add_argument("--task", default="single_number")
    ap.add_argument("--length", default="16k")
    ap.add_argument("--depths", default="0.5,0.9")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compression", default="int4")
    ap.add_argument("--kv-config", default="{}", help="the bodies' KVMemoryConfig overrides (as the grid's)")
    ap.add_argument("--variants", nargs="+", default=["{}"], help="RetrievalPolicy overrides (JSON)")
    ap.add_argument("--body-cache", default="/tmp/bodies")
    ap.add_argument("--no-record", action="store_true", help="answers only (no exact rank scoring: faster)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--analyze", nargs="*", default=None, help="only: summarize these scores_*.pt files")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "longctx_grid" / "rank"))
    a = ap.parse_args(argv)
    if a.analyze is not None:
        print(analyze(a.analyze))
        return
    from memserve.runtime.loader import load_checkpoint

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint("default", progress=False)
    tok = ckpt.tokenizer
    L = _parse_len(a.length)
    ns = argparse.Namespace(n_local=None, topk=None, kv_config=a.kv_config, chunk=512)
    eng = engine_for(ckpt, a.compression, ns, L + 256)
    mem = eng.memory
    for fam in a.families.split(","):
        for d in (float(x) for x in a.depths.split(",")):
            sample = make_family_sample(fam, a.task, tok, L, d, a.seed)
            full = prompt_text(sample, tok)
            ids = tok.encode(full)
            span = needle_span(sample, tok, full)
            name = "-".join(map(str, (fam, a.task, a.compression, L, d, a.seed)))
            body = Path(a.body_cache) / f"{name}.safetensors"
            if not body.exists():
                print(f"# {name}: no body at {body} (ingest it with bench/longctx_grid.py --body-cache)", flush=True)
                continue
            cut = (len(ids) - 1) // 256 * 256
            raws = {}
            for var in a.variants:
                sid = f"rank-{name}"
                with torch.inference_mode():
                    mem.load_session(str(body), sid)
                    smem = mem.sessions.get(sid).memory
                    pol = smem.cfg.policy  # one object, shared by the session's layers
                    want = dataclasses.replace(eng.memory.cfg.policy, **json.loads(var))
                    for f in dataclasses.fields(pol):
                        setattr(pol, f.name, getattr(want, f.name))
                    rec = None if a.no_record else RankRecorder(smem, span)
                    if rec is not None:  # steps: the question chunk, then each decode step
                        orig_step = eng.step

                        def step(orig_step=orig_step, rec=rec):
                            rec.begin(f"s{len(rec.steps)}")
                            return orig_step()

                        eng.step = step
                    t0 = time.perf_counter()
                    text = run_one(eng, "memory", ids[cut:], MAX_NEW, session_id=sid)[0]
                    if rec is not None:
                        del eng.step  # back to the class's method
                    mem.sessions.delete(sid)
                sc = score(sample, text)
                print(f"{fam:10s} d={d:.2f} {var:60s} score={sc:.0f} out={text!r} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
                row = dict(family=fam, task=a.task, length=L, tokens=len(ids), depth=d, seed=a.seed, variant=var,
                           needle=span, cut=cut, answer=sample.answers, output=text, score=sc,
                           steps=[s for s in rec.steps if s["layers"]] if rec else None)
                with open(out / "rank.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                if rec is not None:
                    raws[var] = [r for r in rec.raw if r][:2]
                    blocks = rec.steps[0]["layers"][0]["blocks"]
            if raws:
                torch.save(dict(span=span, blocks=blocks, raws=raws), out / f"scores_{fam}_{d}.pt")


if __name__ == "__main__":
    main()
