"""Offline long-context task generators (nothing is downloaded).

* passkey -- the prompt of Landmark Attention (Mohtashami & Jaggi, 2023) used by InfLLM: the filler
  "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
  repeated, with "The pass key is N. Remember it. N is the pass key." at a chosen depth.
* RULER-style (Hsieh et al., 2024) synthetic tasks over the same noise haystack:
  niah_single, niah_multikey (distractor needles with other keys), niah_multivalue (one key, several
  values, all must be recalled), variable_tracking (VAR chains; name every variable bound to a value).

A sample is a chat message list plus the expected answers; `score` is the fraction of answers found
in the output. Lengths are in tokens of the given tokenizer (the haystack is sized by measurement).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_HEAD = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information there.")
TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")
_WORDS = ("amber", "basil", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
          "kestrel", "lantern", "meadow", "nectar", "orchid", "pebble", "quartz", "raven", "saffron", "tundra")


@dataclass(slots=True)
class Sample:
    task: str
    messages: list[dict]  # chat messages (one user turn)
    answer_prefix: str  # appended after the assistant header so a tiny model answers directly
    answers: list[str]
    depth: float
    target_tokens: int
    meta: dict = field(default_factory=dict)


def score(sample: Sample, output: str) -> float:
    """Fraction of expected answers present in the generated text."""
    return sum(a in output for a in sample.answers) / len(sample.answers)


def _haystack(needles: list[tuple[float, str]], n_filler: int) -> str:
    """n_filler filler sentences-groups with each needle inserted at its depth fraction (0..1)."""
    parts = [FILLER] * n_filler
    for depth, text in sorted(needles, key=lambda x: -x[0]):  # insert from the back: indices stay valid
        parts.insert(round(depth * n_filler), text)
    return " ".join(parts)


def _fit(build, tokenizer, target_tokens: int):
    """Pick the filler count so that the full prompt is close to (not above) target_tokens."""
    per = max(1, len(tokenizer.encode(" " + FILLER)))
    base = len(tokenizer.encode(build(0)[0]))
    n = max(0, (target_tokens - base) // per)
    text, extra = build(n)
    while n > 0 and len(tokenizer.encode(text)) > target_tokens:
        n -= max(1, n // 50)
        text, extra = build(n)
    return text, extra


def make_sample(task: str, tokenizer, target_tokens: int, depth: float, seed: int) -> Sample:
    """One sample of `task` whose user message is about `target_tokens` tokens, needle at `depth`."""
    assert task in TASKS, f"task must be one of {TASKS}"
    assert 0.0 <= depth <= 1.0
    rng = random.Random(f"{task}:{target_tokens}:{depth}:{seed}")

    def num() -> str:
        return str(rng.randint(1_000_000, 9_999_999))

    if task == "passkey":
        key = str(rng.randint(10_000, 99_999))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        build = lambda n: (f"{PASSKEY_HEAD} {_haystack([(depth, needle)], n)} What is the pass key?", None)
        text, _ = _fit(build, tokenizer, target_tokens)
        return Sample(task, [{"role": "user", "content": text}], "The pass key is", [key], depth, target_tokens)

    head = "Some special magic numbers are hidden within the following text. Make sure to memorize them."
    if task in ("niah_single", "niah_multikey", "niah_multivalue"):
        keys = rng.sample(_WORDS, 4)
        key = keys[0]
        if task == "niah_single":
            answers = [num()]
            needles = [(depth, f"One of the special magic numbers for {key} is: {answers[0]}.")]
        elif task == "niah_multikey":  # three distractor keys at random depths
            answers = [num()]
            needles = [(depth, f"One of the special magic numbers for {key} is: {answers[0]}.")]
            needles += [(rng.random(), f"One of the special magic numbers for {k} is: {num()}.") for k in keys[1:]]
        else:  # multivalue: four values of the same key spread around the depth
            answers = [num() for _ in range(4)]
            needles = [(min(1.0, max(0.0, depth + rng.uniform(-0.1, 0.1))),
                        f"One of the special magic numbers for {key} is: {a}.") for a in answers]
        many = "are all the special magic numbers" if task == "niah_multivalue" else "is the special magic number"
        question = f"What {many} for {key} mentioned in the provided text?"
        build = lambda n: (f"{head} {_haystack(needles, n)} {question}", None)
        text, _ = _fit(build, tokenizer, target_tokens)
        prefix = f"The special magic number{'s' if task == 'niah_multivalue' else ''} for {key} mentioned in the provided text {'are' if task == 'niah_multivalue' else 'is'}"
        return Sample(task, [{"role": "user", "content": text}], prefix, answers, depth, target_tokens)

    # variable tracking: a chain of 4 assignments starting at `depth`, one distractor chain elsewhere
    value, other = num(), num()
    names = [f"{rng.choice(_WORDS).upper()[:3]}{rng.randint(10, 99)}" for _ in range(8)]
    names = list(dict.fromkeys(names))
    while len(names) < 8:
        names.append(f"X{len(names)}{rng.randint(100, 999)}")
    chain, distract = names[:4], names[4:8]
    step = 0.04
    needles = [(min(1.0, depth + i * step), f"VAR {chain[i]} = " + (value if i == 0 else f"VAR {chain[i - 1]}") + ".")
               for i in range(4)]
    d2 = rng.random()
    needles += [(min(1.0, d2 + i * step), f"VAR {distract[i]} = " + (other if i == 0 else f"VAR {distract[i - 1]}") + ".")
                for i in range(4)]
    question = f"Find all variables that are assigned the value {value} in the text above."
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text."
    build = lambda n: (f"{head} {_haystack(needles, n)} Question: {question}", None)
    text, _ = _fit(build, tokenizer, target_tokens)
    return Sample(task, [{"role": "user", "content": text}],
                  f"Answer: According to the chain(s) of variable assignment in the text above, {len(chain)} "
                  "variables are assigned the value " + value + ", they are:", chain, depth, target_tokens)


def prompt_text(sample: Sample, tokenizer) -> str:
    """Chat-templated prompt ending in the answer prefix (the assistant starts answering)."""
    return tokenizer.apply_chat_template(sample.messages, add_generation_prompt=True) + sample.answer_prefix
