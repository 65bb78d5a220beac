"""The memorize demo (issue 16 item 3): teach SmolLM2 N fictional facts through one memory layer.

    python bench/memorize_demo.py --n 1000 --layer 24 --work /tmp/memdemo [--epochs E --top-t T --lr LR]

Steps: init-memory on the base (value_proj = 0: the memory model equals the base) -> memorize (timed)
-> exact-match recall on the HELD-OUT question phrasings (and on training phrasings cut before the
answer) of the model before (the init-memory directory) and after; perplexity of general text (stdlib
docstring paragraphs that the slot idf never saw) before / after; greedy agreement on 20 unrelated chat
prompts before / after. Before and after share the frozen layers below the memory (run once).
Prints a markdown table and writes results JSON to --work.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from filler_families import stdlib_paragraphs, units  # noqa: E402
from memory_facts import answer_prompt, make_facts, write_jsonl  # noqa: E402

UNRELATED = ["Write a haiku about the sea.", "What is the capital of France?", "Explain photosynthesis briefly.",
             "List three uses of a paperclip.", "How do I reverse a list in Python?", "Tell me a fun fact about cats.",
             "What is 12 times 7?", "Describe a sunrise in one sentence.", "Why is the sky blue?",
             "Give me a tip for learning to cook.", "Who wrote Romeo and Juliet?", "What does a CPU do?",
             "Suggest a name for a pet turtle.", "How many legs does a spider have?", "What is gravity?",
             "Translate 'good morning' into Spanish.", "What is the boiling point of water?",
             "Name a famous painting.", "How do bees make honey?", "What is a prime number?"]


def general_text(n_par: int) -> tuple[list[str], list[str]]:
    """(background for the slot idf, held-out text for perplexity): disjoint stdlib paragraphs + prose."""
    paras = stdlib_paragraphs()
    prose = units("prose", 0)
    bg = list(paras[0::2]) + [" ".join(next(prose) for _ in range(8)) for _ in range(100)]
    return bg, list(paras[1::2])[:n_par]


def _stack(model_dir: str):
    from memserve.runtime.ffn import values_name
    from memserve.runtime.loader import load_checkpoint
    from memserve.runtime.memory_layers_stack import FrozenStack

    ck = load_checkpoint(model_dir, progress=False)
    mc = ck.config.memory_layers
    tables = {}
    for i in (mc.layers if mc is not None else []):
        n = values_name(mc, i)
        sc = ck.weights.get(n.removesuffix(".weight") + ".scales")
        tables[n] = ck.weights[n].float() * (1 if sc is None else sc[:, None])
    return FrozenStack(ck.config, ck.weights), ck, tables


@torch.no_grad()
def _hidden(models: list, ids: torch.Tensor) -> list[torch.Tensor]:
    """Final hidden states of each model (same base below their first memory layer L, e.g. a memory model
    before and after memorize): layers below L run once, each model runs its memory at L and the rest."""
    st0, _, tab0 = models[0]
    L = min(st0.mc.layers)
    x, r = st0.below(ids, L, tab0)
    return [st.above(r + st.memory_out(L, *st.lookup(L, x), tab), L + 1, tab) for st, _, tab in models]


@torch.no_grad()
def perplexity(models: list, texts: list[str]) -> list[float]:
    """exp(mean token NLL) of the paragraphs (each truncated to 256 tokens), per model."""
    tok = models[0][1].tokenizer
    nll, n = [0.0] * len(models), 0
    for t in texts:
        ids = torch.tensor([tok.encode(t, add_special_tokens=True)[:256]])
        for m, h in enumerate(_hidden(models, ids)):
            nll[m] += float(torch.nn.functional.cross_entropy(models[m][0].logits(h[0, :-1]), ids[0, 1:],
                                                              reduction="sum"))
        n += ids.shape[1] - 1
    return [math.exp(x / n) for x in nll]


@torch.no_grad()
def _answer_argmax(models: list, pairs: list[tuple[str, str]], batch: int = 32) -> list[list[bool]]:
    """Teacher-forced exact match, per model: at every answer token (the space before it included) the
    argmax of the model is that token. Equivalent to "greedy decoding from the prompt produces the
    answer's tokens", at one batched forward per prompt instead of a decode loop (the box is shared)."""
    tok = models[0][1].tokenizer
    seqs = []
    for prompt, ans in pairs:
        p = tok.encode(prompt, add_special_tokens=True)
        full = tok.encode(prompt + " " + ans, add_special_tokens=True)
        k = next((i for i, (x, y) in enumerate(zip(p, full)) if x != y), min(len(p), len(full)))
        seqs.append((full, k))
    out: list[list[bool]] = [[] for _ in models]
    for a in range(0, len(seqs), batch):
        part = seqs[a:a + batch]
        T = max(len(f) for f, _ in part)
        ids = torch.zeros(len(part), T, dtype=torch.long)
        for b, (f, _) in enumerate(part):
            ids[b, :len(f)] = torch.tensor(f)
        for m, h in enumerate(_hidden(models, ids)):
            for b, (f, k) in enumerate(part):
                pred = models[m][0].logits(h[b, k - 1:len(f) - 1]).argmax(-1)
                out[m].append(bool((pred == ids[b, k:len(f)]).all()))
    return out


def recall(models: list, facts: list[dict]) -> list[dict]:
    qp = [(p, f["answer"]) for f in facts for p in f["question_prompts"]]
    tp = [(answer_prompt(f["train"][0], f["answer"]), f["answer"]) for f in facts]
    res = []
    for held, train in zip(_answer_argmax(models, qp), _answer_argmax(models, tp)):
        per_fact = [all(held[i:i + 2]) for i in range(0, len(held), 2)]  # both held-out phrasings right
        res.append({"heldout_phrasings": sum(held) / len(held), "heldout_facts_all": sum(per_fact) / len(per_fact),
                    "train_phrasing": sum(train) / len(train)})
    return res


def greedy(model_dir: str, questions: list[str] = UNRELATED) -> list[list[int]]:
    from memserve.runtime import LLM, SamplingParams

    llm = LLM(model_dir)
    tok = llm.engine.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in questions]
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", default="default")
    ap.add_argument("--layer", type=int, default=24)
    ap.add_argument("--n-keys", type=int, default=256)
    ap.add_argument("--knn", type=int, default=32)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--top-t", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--ppl-paragraphs", type=int, default=40)
    ap.add_argument("--paraphrases", type=int, default=0, help="extra training phrasings per fact (memory_facts)")
    ap.add_argument("--no-gate", action="store_true")
    ap.add_argument("--memory-at", default="all", choices=["answer", "all"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default; on a loaded box 1 "
                    "thread ran 3-5x faster than 2, measured)")
    ap.add_argument("--lock", help="hold this flock file (e.g. /tmp/memserve-bench.lock) during memorize only")
    ap.add_argument("--work", default="/tmp/memorize_demo")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from memserve.runtime.memory_layers_init import init_memory
    from memserve.runtime.memory_layers_memorize import memorize

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    facts = make_facts(a.n, a.seed, a.paraphrases)
    write_jsonl(facts, work / "facts.jsonl")
    mem = work / f"mem{a.layer}_k{a.n_keys}"
    if not (mem / "config.json").is_file():
        init_memory(a.base, str(mem), [a.layer], n_keys=a.n_keys, heads=a.heads, knn=a.knn, k_dim=256)
    bg, ppl_text = general_text(a.ppl_paragraphs)
    res = {"args": vars(a), "cpu_threads": torch.get_num_threads()}
    lock = _bench_lock(a.lock, f"memorize demo N={a.n}") if a.lock else None  # the timed part only
    res["load_before"] = open("/proc/loadavg").read().split()[:3]
    t0 = time.perf_counter()
    r = memorize(str(mem), facts, str(work / "taught"), epochs=a.epochs, top_t=a.top_t, lr=a.lr,
                 batch_size=a.batch_size, background=bg, seed=a.seed, gate=not a.no_gate, memory_at=a.memory_at)
    res["memorize_wall_s"] = time.perf_counter() - t0
    res["load_after"] = open("/proc/loadavg").read().split()[:3]
    if lock is not None:
        lock.close()
    res["memorize"] = {"examples": r.examples, "steps": r.steps, "cache_s": r.cache_seconds,
                       "rows_written": r.rows_written, "losses": r.losses, "alpha": r.value_proj_scale,
                       "gate": r.gate}
    print("memorize:", res["memorize_wall_s"], res["memorize"], flush=True)
    models = [_stack(str(mem)), _stack(str(r.out))]  # before = the init-memory model (= the base)
    res["before"], res["after"] = recall(models, facts)
    res["ppl_before"], res["ppl_after"] = perplexity(models, ppl_text)
    del models
    g0, g1 = greedy(str(mem)), greedy(str(r.out))
    res["greedy_identical"] = sum(x == y for x, y in zip(g0, g1)) / len(g0)
    tok_agree = [sum(1 for _ in iter_prefix(x, y)) / max(len(x), 1) for x, y in zip(g0, g1)]
    res["greedy_prefix_agreement"] = sum(tok_agree) / len(tok_agree)
    res["ppl_drift_pct"] = 100 * (res["ppl_after"] / res["ppl_before"] - 1)
    (work / f"results_n{a.n}.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    print(f"| N | held-out recall before | after | (all phrasings of a fact) | training-phrasing recall after | "
          f"memorize wall | ppl before -> after (drift) | greedy identical (20 prompts) |\n|---|---|---|---|---|---|---|---|\n"
          f"| {a.n} | {res['before']['heldout_phrasings']:.1%} | {res['after']['heldout_phrasings']:.1%} | "
          f"{res['after']['heldout_facts_all']:.1%} | {res['after']['train_phrasing']:.1%} | "
          f"{res['memorize_wall_s'] / 60:.1f} min | {res['ppl_before']:.3f} -> {res['ppl_after']:.3f} "
          f"({res['ppl_drift_pct']:+.2f}%) | {res['greedy_identical']:.0%} |")


def _bench_lock(path: str, what: str):
    """Take the shared bench lock (blocking) and say who holds it since when in <lock>.owner."""
    import fcntl

    f = open(path, "a")
    fcntl.flock(f, fcntl.LOCK_EX)
    Path(path.removesuffix(".lock") + ".owner").write_text(
        f"{what}: held since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} (up to ~35 min)\n")
    print("bench lock held", time.strftime("%H:%M:%S"), flush=True)
    return f


def iter_prefix(x, y):
    for u, v in zip(x, y):
        if u != v:
            return
        yield u


if __name__ == "__main__":
    main()
