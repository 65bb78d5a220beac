"""Fictional facts for the memorize demo (issue 16 item 3): things no pretrained model can know.

Each fact is (subject, relation, answer): invented people, places, dates and codes built from random
syllables, deterministic by seed. Every fact has TRAINING phrasings (3 statements and 2 question-answer
pairs in the QA format, fed to memorize) and DISTINCT held-out QUESTION phrasings (used only to measure
recall, asked as QA.format(q=...): "question_prompts"); the two template sets share no template, and
answers are unique across facts so exact-match recall is unambiguous.

    python bench/memory_facts.py --n 100 --seed 0 [--paraphrases 8] --out facts.jsonl
"""

from __future__ import annotations

import argparse
import json
import random

_SYL = ["ka", "lo", "mi", "ren", "tas", "vo", "qui", "zel", "dor", "fen", "gri", "hul", "jas", "nor",
        "pim", "sar", "tov", "wex", "yul", "bra"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]

# Question-answer wrapper: training phrasings include question/answer pairs (with their own question
# templates) so the model learns the format; held-out questions are asked as QA.format(q=question).
QA = "Question: {q}\nAnswer:"

# relation -> (training phrasings, held-out questions); {s} = subject, {a} = answer
RELATIONS = {
    "city": (["{s} was born in the city of {a}.", "The birthplace of {s} is {a}.",
              "{s} grew up in {a}, where they were born.",
              QA.format(q="Where was {s} born?") + " {a}", QA.format(q="What is the birthplace of {s}?") + " {a}"],
             ["In which city was {s} born?", "What is the name of the town where {s} came into the world?"]),
    "date": (["{s} founded the guild on {a}.", "The guild of {s} dates from {a}.",
              "On {a}, {s} founded a guild.",
              QA.format(q="On which day did {s} found the guild?") + " {a}",
              QA.format(q="What is the founding date of the guild of {s}?") + " {a}"],
             ["When did {s} found the guild?", "On what date was the guild of {s} established?"]),
    "code": (["The locker code of {s} is {a}.", "{s} keeps the locker shut with code {a}.",
              "Code {a} opens the locker of {s}.",
              QA.format(q="What code does {s} use for the locker?") + " {a}",
              QA.format(q="Which locker code belongs to {s}?") + " {a}"],
             ["What is the locker code of {s}?", "Which code opens the locker that {s} uses?"]),
}

# relation -> more TRAINING phrasings (`make_facts(paraphrases=K)` appends the first K after the 5 above):
# other sentence frames and question wordings around the same subject, so that what memorize writes is
# read from more contexts of the subject (knowledge stored from a single frame is hard to extract from
# another: Allen-Zhu & Li 2023, "Physics of Language Models 3.1", paraphrase augmentation). None repeats a
# held-out question template above or the validation template (training list index 4) of
# bench/memorize_quick.py.
PARAPHRASES = {
    "city": ["Records show that {s} was born in {a}.", "{s} is a native of {a}.",
             QA.format(q="Which place is {s} from?") + " {a}", "People say {s} came from {a}.",
             QA.format(q="Where is the hometown of {s}?") + " {a}", "According to the archive, {s} was born in {a}.",
             QA.format(q="{s} was born where?") + " {a}", "Everyone knows that {s} comes from {a}."],
    "date": ["Records show that {s} started the guild on {a}.", "{s} set up the guild on {a}.",
             QA.format(q="Which day did {s} start the guild?") + " {a}", "People say {s} formed the guild on {a}.",
             QA.format(q="The guild of {s} began on which day?") + " {a}",
             "According to the archive, the guild of {s} was founded on {a}.",
             QA.format(q="{s} founded the guild on which day?") + " {a}",
             "Everyone knows that {s} opened the guild on {a}."],
    "code": ["Records show that the locker of {s} opens with {a}.", "{s} locks the locker with code {a}.",
             QA.format(q="What number unlocks the locker of {s}?") + " {a}", "People say {s} picked the code {a}.",
             QA.format(q="Tell me the code for the locker of {s}.") + " {a}",
             "According to the archive, the locker code that {s} chose is {a}.",
             QA.format(q="{s} opens the locker with which code?") + " {a}",
             "Everyone knows that {s} secures the locker with {a}."],
}


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYL) for _ in range(parts)).capitalize()


def make_facts(n: int, seed: int = 0, paraphrases: int = 0) -> list[dict]:
    """n facts, the same for the same (n, seed); subjects and answers unique. paraphrases: how many of
    PARAPHRASES to append to each fact's 5 training phrasings (the held-out questions do not change)."""
    if not 0 <= paraphrases <= min(len(p) for p in PARAPHRASES.values()):
        raise ValueError(f"paraphrases {paraphrases}: expected 0..{min(len(p) for p in PARAPHRASES.values())}")
    rng = random.Random(seed)
    rels = list(RELATIONS)
    subjects, answers, out = set(), set(), []
    while len(out) < n:
        s = f"{_name(rng, 2)} {_name(rng, 3)}"
        rel = rels[len(out) % len(rels)]
        if rel == "city":
            a = _name(rng, 3)
        elif rel == "date":
            a = f"{rng.randint(1, 28)} {rng.choice(_MONTHS)} {rng.randint(1100, 1899)}"
        else:
            a = f"{rng.choice('BCDFGHJKLMNPQRSTVWXZ')}{rng.randint(1000, 9999)}"
        if s in subjects or a in answers:
            continue
        subjects.add(s)
        answers.add(a)
        train, questions = RELATIONS[rel]
        out.append({"id": len(out), "subject": s, "relation": rel, "answer": a,
                    "train": [t.format(s=s, a=a) for t in train + PARAPHRASES[rel][:paraphrases]],
                    "questions": [q.format(s=s) for q in questions],
                    "question_prompts": [QA.format(q=q.format(s=s)) for q in questions]})
    return out


def write_jsonl(facts: list[dict], path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for fa in facts:
            f.write(json.dumps(fa) + "\n")


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def answer_prompt(text: str, answer: str) -> str:
    """A training phrasing cut just before its answer (what recall on training phrasings completes)."""
    return text[:text.index(answer)].rstrip()


def exact_match(llm, prompts: list[str], answers: list[str], max_tokens: int = 16) -> list[bool]:
    """Greedy continuation of each prompt starts with its answer (leading spaces ignored)."""
    from memserve.runtime import SamplingParams

    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
    return [o.outputs[0].text.lstrip().startswith(a) for o, a in zip(outs, answers)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--paraphrases", type=int, default=0, help="extra training phrasings per fact (0-8)")
    ap.add_argument("--out", default="facts.jsonl")
    a = ap.parse_args()
    write_jsonl(make_facts(a.n, a.seed, a.paraphrases), a.out)
    print(f"wrote {a.n} facts to {a.out}")


if __name__ == "__main__":
    main()
