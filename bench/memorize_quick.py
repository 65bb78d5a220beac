"""A short memorize run (what fits a loaded 2-core box in ~6 min): N demo facts (seed 0, all training
phrasings), recall on the held-out question phrasings and on training phrasings, and perplexity on 10
held-out stdlib paragraphs, before / after. Background for the slot idf: the demo's first 60 paragraphs.

    python bench/memorize_quick.py N EPOCHS MEMDIR OUTDIR    # MEMDIR from init-memory --layers 24 --n-keys 256
"""

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memorize_demo import _answer_argmax, _stack, general_text  # noqa: E402
from memory_facts import answer_prompt, make_facts  # noqa: E402
from memserve.runtime.memory_layers_memorize import memorize  # noqa: E402

N, EP, mem, OUT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
facts = make_facts(N, 0)  # the demo's facts (seed 0), all training phrasings
bg, ppl_text = general_text(10)
bg = bg[:60]


def evaluate(st, tok, tables):
    emb = st.w["model.embed_tokens.weight"]
    held = _answer_argmax(st, tok, emb, tables, [(p, f["answer"]) for f in facts for p in f["question_prompts"]])
    tr = _answer_argmax(st, tok, emb, tables, [(answer_prompt(f["train"][0], f["answer"]), f["answer"]) for f in facts])
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in ppl_text:
            ids = torch.tensor([tok.encode(t, add_special_tokens=True)[:256]])
            h = st.above(torch.nn.functional.embedding(ids, emb), 0, tables)
            nll += float(torch.nn.functional.cross_entropy(st.logits(h[0, :-1]), ids[0, 1:], reduction="sum"))
            n += ids.shape[1] - 1
    return sum(held) / len(held), sum(tr) / len(tr), math.exp(nll / n)


st, ck, tables = _stack(mem)
print("before heldout/train/ppl", evaluate(st, ck.tokenizer, tables), flush=True)
t0 = time.time()
r = memorize(mem, facts, OUT, epochs=EP, background=bg, progress=False,
             on_epoch=lambda e, s, t: print("epoch", e, round(time.time() - t0), flush=True))
print("memorize wall", round(time.time() - t0), "examples", r.examples, "steps", r.steps, "rows", r.rows_written,
      "cache", round(r.cache_seconds), "losses", [round(x, 3) for x in r.losses], "alpha", round(r.value_proj_scale, 1), flush=True)
st, ck, tables = _stack(str(r.out))
print("after heldout/train/ppl", evaluate(st, ck.tokenizer, tables), flush=True)
