"""Why does the memory miss a needle? Per layer and KV head: the needle block's rank among the block
scores and whether it is in the working set, at the question's prefill chunk and at every answer
decode step -- under the engine's defaults and under variants replayed from one prefilled body.

    flock /tmp/memserve-bench.lock env OMP_NUM_THREADS=2 .venv/bin/python bench/kv_memory_diagnose.py \\
        --family prose --length 16k --depths 0.5 --variants '{}' '{"topk": 1000000}' --json-out diag.jsonl

The prompt's body (everything up to the end of the haystack) is prefilled once with the engine's
KV-memory config (KVMemoryConfig defaults + the model's profile + --kv-config, --compression) and its
state kept under --snapshots; each variant (RetrievalPolicy overrides as JSON) then replays only the
question tail and the greedy answer from a copy of that state. '{"topk": 1000000}' selects every block:
if the model still misses, the miss is in how the memory is presented (positions, window, the body's
prefill), not in selection. Forward: bench/kv_memory_probe.py's ProbeModel (same weights and
KVLayerStore as the engine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_memory_probe import ProbeModel  # noqa: E402
from long_context_bench import _parse_len  # noqa: E402
from long_context_tasks import make_family_sample, prompt_text, score  # noqa: E402


def engine_config(model, compression: str, kv_config: dict):
    """The KVMemoryConfig the engine would build for this model (profile under the user's overrides)."""
    from memserve.runtime.kv_memory.profiles import profile_for
    from memserve.runtime.kv_memory_backend import make_config

    c = model.c
    prof = profile_for(c.name or "smollm2-135m", c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                       c.hidden_size)
    return make_config({**(prof.overrides if prof else {}), "compression": compression, **kv_config})


def with_policy(cfg, overrides: dict):
    import dataclasses

    pol = dict(overrides)
    for k in ("dense_layers",):
        if k in pol:
            pol[k] = tuple(pol[k])
    if "layer_topk" in pol:
        pol["layer_topk"] = tuple(tuple(x) for x in pol["layer_topk"])
    return dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, **pol))


class Recorder:
    """Wraps every layer's `_retrieve`: per call, the needle blocks' rank per selection unit (KV head for
    granularity kv_head) under that call's scores, and whether each KV head attends them afterwards."""

    def __init__(self, mem, needle: tuple[int, int]):
        self.mem, self.needle, self.steps = mem, needle, []
        self.current: list | None = None
        for lm in mem.layers:
            orig = lm._retrieve

            def wrapped(q_glob, lm=lm, orig=orig):
                self._record(lm, q_glob)
                res = orig(q_glob)
                self._record_selected(lm, q_glob.shape[0])
                return res

            lm._retrieve = wrapped

    def begin(self, label: str):
        self.current = []
        self.steps.append(dict(step=label, layers=self.current))

    def _needle_blocks(self, lm) -> list[int]:
        bp, bs = lm.block_pos.get(), lm.cfg.block_size
        a, b = self.needle
        return ((bp < b) & (bp + bs > a)).nonzero().flatten().tolist()

    def _record(self, lm, q_glob):
        from memserve.kernels import score_block_reprs

        pol = lm.cfg.policy
        s = score_block_reprs(q_glob.mean(0)[None], [lm.reprs.get().to(q_glob.dtype)], pol.repr_mode)[0]  # (Hq, NB)
        g = s.shape[0] // lm.hkv
        agg = s.reshape(lm.hkv, g, -1).sum(1)  # (Hkv, NB): what kv_head selection ranks
        blocks = self._needle_blocks(lm)
        ranks = [[int((agg[h] > agg[h, b]).sum()) for h in range(lm.hkv)] for b in blocks]
        # how flat the scores are: gap between the needle block and the best one, in std of that head's scores
        z = [[round(float((agg[h, b] - agg[h].mean()) / agg[h].std().clamp_min(1e-6)), 2) for h in range(lm.hkv)]
             for b in blocks]
        self.current.append(dict(layer=lm.layer, nb=lm.num_blocks, blocks=blocks, ranks=ranks, z=z))

    def _record_selected(self, lm, t: int):
        rec = self.current[-1]
        hkv = lm.hkv
        if t > 1:  # prefill chunk: its sticky mask, or recompute nothing (record ranks only)
            m = lm.sticky
            sel = None if m is None else m.view(hkv, -1, m.shape[1])[:, 0]
        else:
            slots = lm.dec_slots
            sel = None
            if slots is not None:
                rows = slots.shape[0]  # Hkv, or Hq for q_head (then: any query head of the KV head's group)
                sel = torch.zeros(rows, lm.num_blocks + 1, dtype=torch.bool)
                sel.scatter_(1, torch.where(slots >= 0, slots, lm.num_blocks), True)
                sel = sel.view(hkv, rows // hkv, -1).any(1)
        rec["selected"] = None if sel is None else [[bool(sel[h, b]) for h in range(hkv)] for b in rec["blocks"]]
        rec["n_selected"] = None if sel is None else int(sel[:, : lm.num_blocks].sum(1).max())


def needle_span(sample, tok, full: str) -> tuple[int, int]:
    """Token positions [first token of the needle sentence, last token of its answer + 1)."""
    content = sample.messages[0]["content"]
    c0 = full.index(content)
    n0 = c0 + sample.meta["needle_offsets"][0]
    a_end = full.index(sample.answers[0], n0) + len(sample.answers[0])
    return len(tok.encode(full[:n0])), len(tok.encode(full[:a_end]))


def _summary(step: dict) -> tuple[str, str, str, str]:
    """(layers where some KV head attends the needle's answer block, KV heads that do (% of layer-heads),
    median rank over layer-heads, per-layer best rank compacted) for one recorded step."""
    lay = [r for r in step["layers"] if r["blocks"]]
    if not lay:
        return "-", "-", "-", "in window"
    # the block holding the answer's last token (the needle sentence may span two blocks)
    best = [min(rk[-1]) for rk in (r["ranks"] for r in lay)]
    sel = [r["selected"][-1] if r.get("selected") else None for r in lay]
    n_l = sum(1 for s in sel if s and any(s))
    heads = [h for s in sel if s for h in s]
    allr = sorted(x for r in lay for x in r["ranks"][-1])
    med = allr[len(allr) // 2]
    return (f"{n_l}/{len(lay)}", f"{100 * sum(heads) / max(1, len(heads)):.0f}%" if heads else "-", str(med),
            " ".join(str(b) for b in best))


def report(rows: list[dict]) -> str:
    """Markdown: one row per (family, depth, seed, variant) at the first answer token's decode step."""
    out = ["| family | depth | seed | variant | score | output | blocks | step | layers selecting | "
           "layer-heads selecting | median rank | best rank per layer (0..29) |", "|" + "---|" * 12]
    for r in rows:
        steps = [s for s in r["steps"] if s["step"] != "tail"]
        # the decode step that emits the answer's first digit: the step after the one whose input is " "
        first = next((s for s in steps if any(ch.isdigit() for ch in s["step"].split(":", 1)[1])), None)
        use = [s for s in r["steps"] if s["step"] == "tail"] + ([first] if first else steps[:1])
        nb = next((x["nb"] for s in r["steps"] for x in s["layers"] if x["nb"]), 0)
        for s in use:
            n_l, heads, med, best = _summary(s)
            out.append(f"| {r['family']} | {r['depth']} | {r['seed']} | `{r['variant']}` | {r['score']:.0f} | "
                       f"{r['output'][:28]!r} | {nb} | {s['step'].split(':')[0]} | {n_l} | {heads} | {med} | {best} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="prose")
    ap.add_argument("--task", default="single_number")
    ap.add_argument("--length", default="16k")
    ap.add_argument("--depths", default="0.5")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--compression", default="int4")
    ap.add_argument("--kv-config", default="{}", help="KVMemoryConfig overrides for the body's prefill (JSON)")
    ap.add_argument("--variants", nargs="+", default=["{}"], help="RetrievalPolicy overrides (JSON) for the tail")
    ap.add_argument("--max-new", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--snapshots", default="/tmp/memserve_diag")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--report", default=None, help="only summarize this JSON-lines file into a markdown table")
    a = ap.parse_args(argv)
    if a.report:
        print(report([json.loads(x) for x in open(a.report)]))
        return
    from memserve.runtime.kv_memory import SequenceKVMemory
    from memserve.runtime.loader import load_checkpoint

    torch.set_num_threads(a.threads)
    model = ProbeModel(load_checkpoint("default", progress=False))
    tok, c = model.tok, model.c
    base = engine_config(model, a.compression, json.loads(a.kv_config))
    L = _parse_len(a.length)
    for seed in (int(s) for s in a.seeds.split(",")):
        for depth in (float(d) for d in a.depths.split(",")):
            sample = make_family_sample(a.family, a.task, tok, L, depth, seed)
            full = prompt_text(sample, tok)
            ids = tok.encode(full)
            span = needle_span(sample, tok, full)
            content = sample.messages[0]["content"]
            hay_end = full.index(content) + sample.meta["haystack_span"][1]
            n_body = len(tok.encode(full[:hay_end])) - 1
            assert ids[:n_body] == tok.encode(full[:hay_end])[:n_body]
            # policy fields added later are left out of the key at their default, so that states saved
            # before they existed are still found
            cfg_repr = repr(base).replace(", unselected='drop'", "").replace(", rerank=0", "").replace(
                ", repr_outliers=0", "")
            # RetrievalPolicy.exact* act only where the prompt ends (never in the body's prefill, which has no
            # prompt_end here): left out of the key at any value, so a profile that sets them finds the states
            cfg_repr = re.sub(r", exact(_every|_topk)?=('[a-z]+'|\d+)", "", cfg_repr)
            key = hashlib.md5(json.dumps([a.family, a.task, L, depth, seed, a.compression, a.kv_config,
                                          cfg_repr]).encode()).hexdigest()[:10]
            snap = Path(a.snapshots) / f"{a.family}_{a.length}_{key}.pt"
            print(f"# {a.family} {len(ids)} tok depth {depth} seed {seed} needle tokens {span} body {n_body} "
                  f"answer {sample.answers}", flush=True)
            with torch.inference_mode():
                if not snap.exists():
                    mem = SequenceKVMemory(base, c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
                    t0 = time.time()
                    for p in range(0, n_body, base.chunk_size):
                        model.forward(torch.tensor(ids[p : min(n_body, p + base.chunk_size)]), mem, p)
                    snap.parent.mkdir(parents=True, exist_ok=True)
                    torch.save([lm.state_tensors() for lm in mem.layers], snap)
                    print(f"# body prefilled in {time.time() - t0:.0f} s -> {snap}", flush=True)
                states = torch.load(snap)
                for var in a.variants:
                    over = json.loads(var)
                    exact = over.pop("_exact_reprs", False)
                    outliers = over.pop("_repr_outliers", 0)
                    cfg = with_policy(base, over)
                    mem = SequenceKVMemory(cfg, c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
                    for lm, st in zip(mem.layers, states):
                        lm.load_state({k: v.clone() for k, v in st.items()})
                        lm.hq = c.num_attention_heads
                        if exact:  # replay only: every stored key of a block is a representative (score =
                            # exact max q.k over the block, int4 keys) -- the ceiling of a re-ranking stage
                            from memserve.runtime.kv_memory.buffers import _Rows

                            kb, _ = lm._load_blocks(torch.arange(lm.num_blocks))  # (NB, Hkv, bs, D)
                            lm.reprs = _Rows(dim=2)
                            lm.reprs.append(kb.to(lm.wv.buf.dtype).permute(1, 3, 0, 2), spare=8)
                            lm._representatives = lambda kb, sc: kb  # blocks packed during the replay too
                        if outliers:  # replay only: the saved representatives + the block's `outliers` keys
                            # farthest from its mean key (from the stored int4 keys)
                            from memserve.runtime.kv_memory.buffers import _Rows
                            from memserve.runtime.kv_memory.representatives import outlier_keys

                            kb, _ = lm._load_blocks(torch.arange(lm.num_blocks))  # (NB, Hkv, bs, D)
                            extra = outlier_keys(kb.to(lm.wv.buf.dtype), outliers).permute(1, 3, 0, 2)
                            old_r = lm.reprs.get()
                            lm.reprs = _Rows(dim=2)
                            lm.reprs.append(torch.cat((old_r, extra), 3), spare=8)
                            orig_rep = lm._representatives

                            def rep(kb, sc, orig_rep=orig_rep, n=outliers):
                                return torch.cat((orig_rep(kb, sc), outlier_keys(kb, n)), 2)

                            lm._representatives = rep
                    mem.set_prompt_end(len(ids))  # as the engine's backend does (RetrievalPolicy.exact)
                    rec = Recorder(mem, span)
                    p = n_body
                    rec.begin("tail")
                    while p < len(ids):
                        n = min(cfg.chunk_size, len(ids) - p)
                        logits = model.forward(torch.tensor(ids[p : p + n]), mem, p)
                        p += n
                    out = []
                    for step in range(a.max_new):
                        nxt = int(logits.argmax())
                        out.append(nxt)
                        if nxt in tok.eos_token_ids:
                            break
                        rec.begin(f"d{step}:{tok.decode([nxt])}")
                        logits = model.forward(torch.tensor([nxt]), mem, p)
                        p += 1
                    text = tok.decode(out)
                    sc = score(sample, text)
                    print(f"{var:50s} score={sc:.2f} out={text!r}", flush=True)
                    if a.json_out:
                        with open(a.json_out, "a") as f:
                            f.write(json.dumps(dict(family=a.family, task=a.task, length=L, tokens=len(ids),
                                                    depth=depth, seed=seed, variant=var, kv_config=a.kv_config,
                                                    compression=a.compression, needle=span, answer=sample.answers,
                                                    output=text, score=sc, steps=rec.steps)) + "\n")


if __name__ == "__main__":
    main()
