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


# ---------------------------------------------------------------------------------------------------------
# Issue 15: tasks over filler FAMILIES (bench/filler_families.py), several phrasings and needle kinds, exact
# token lengths, needles placed at a token depth. `make_family_sample(family, task, tok, L, depth, seed)`.
# ---------------------------------------------------------------------------------------------------------
from filler_families import FAMILIES, joiner, units  # noqa: E402

FAMILY_TASKS = ("single_number", "single_word", "single_sentence", "multikey", "multivalue",
                "variable_tracking", "two_fact", "long_list")
_KEYS = ("the pass key", "the access code", "the secret number", "the vault combination", "the launch code",
         "the magic number")
_STATE = ("{K} is {V}.", "Remember this: {k} is {V}.", "Note that {k} is {V}. Do not forget it.",
          "For the record, {k} is {V}.", "Important: {k} is {V}. {V} is {k}.")
_ASK = ("What is {k}?", "Which number is {k}? Answer with the number.", "Recall {k} mentioned in the document.")
_HEADS = ("Below is a long document. A fact that you will be asked about is hidden somewhere in it.",
          "Read the following text carefully; it contains information you will need later.",
          "There is an important piece of information hidden inside a lot of other text. Find it and memorize it.")
_SYL = ("zor", "va", "nti", "ke", "lum", "bra", "qui", "sto", "fen", "dru", "mal", "ixo", "pel", "tar", "ug")
_S_ADJ = ("silver", "sleepy", "crooked", "patient", "hollow", "scarlet", "humble", "restless")
_S_NOUN = ("lantern", "walrus", "teapot", "glacier", "violin", "pigeon", "compass", "orchard")
_S_VERB = ("sleeps", "hums", "waits", "dances", "rusts", "glows", "hides", "wanders")


def _ntok(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text))


def _place(tokenizer, family: str, seed: int, head: str, question: str, needles: list[tuple[float, str]],
           target_tokens: int):
    """Content = head + haystack (filler units with needles at token depths) + question, exactly
    `target_tokens` tokens when a character-level trim of the last filler unit can reach it (else 1-2 below).

    Returns (content, haystack_span (start, end) in characters, needle char offsets in needle order).
    """
    j = joiner(family)
    fixed = _ntok(tokenizer, f"{head}\n\n{j.join(t for _, t in needles)}\n\n{question}")
    budget = max(0, target_tokens - fixed)
    it = units(family, seed)
    fill, lens, total = [], [], 0
    while total < budget + 64:  # a little over: the trim below takes it back to the target
        u = next(it)
        fill.append(u)
        lens.append(_ntok(tokenizer, j + u))
        total += lens[-1]

    def build(fill_units):
        cum, acc = [], 0  # token offset at which each unit starts
        for k, u in enumerate(fill_units):
            cum.append(acc)
            acc += lens[k] if k < len(lens) and fill_units[k] is fill[k] else _ntok(tokenizer, j + u)
        order = sorted(range(len(needles)), key=lambda i: needles[i][0])
        slots: dict[int, list[int]] = {}
        for i in order:  # needle i goes before the first unit that starts at/after depth * acc
            pos = next((k for k, c in enumerate(cum) if c >= needles[i][0] * acc), len(fill_units))
            slots.setdefault(pos, []).append(i)
        parts, which = [], []
        for k in range(len(fill_units) + 1):
            for i in slots.get(k, []):
                parts.append(needles[i][1])
                which.append(i)
            if k < len(fill_units):
                parts.append(fill_units[k])
                which.append(None)
        hay = j.join(parts)
        content = f"{head}\n\n{hay}\n\n{question}"
        offs, c = [0] * len(needles), len(head) + 2
        for p, w in zip(parts, which):
            if w is not None:
                offs[w] = c
            c += len(p) + len(j)
        return content, (len(head) + 2, len(head) + 2 + len(hay)), offs

    # drop whole units from the end until under the target, then add back words of the dropped unit
    content, span, offs = build(fill)
    while fill and _ntok(tokenizer, content) > target_tokens:
        last = fill.pop()
        lens = lens[:len(fill)]
        content, span, offs = build(fill)
    words = list(last) if fill else []  # characters: a cut mid-word in filler is harmless, and lands exactly
    lo, hi = 0, len(words)  # binary search: longest prefix of `last` that keeps the content within the target
    best = (content, span, offs)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        cand = build(fill + ["".join(words[:mid])])
        if _ntok(tokenizer, cand[0]) <= target_tokens:
            lo, best = mid, cand
        else:
            hi = mid - 1
    return best


def _code(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def make_family_sample(family: str, task: str, tokenizer, target_tokens: int, depth: float, seed: int) -> Sample:
    """One `task` sample over `family` filler: user message of `target_tokens` tokens, needle at `depth`."""
    assert family in FAMILIES, f"family must be one of {FAMILIES}"
    assert task in FAMILY_TASKS, f"task must be one of {FAMILY_TASKS}"
    assert 0.0 <= depth <= 1.0
    rng = random.Random(f"{family}:{task}:{target_tokens}:{depth}:{seed}")
    head = rng.choice(_HEADS)
    meta: dict = {"family": family}
    if task == "single_number":
        k, v = rng.choice(_KEYS), _code(rng)
        st = rng.choice(_STATE).format(K=k[0].upper() + k[1:], k=k, V=v)
        needles, answers = [(depth, st)], [v]
        question, prefix = rng.choice(_ASK).format(k=k), f"{k[0].upper() + k[1:]} is"
    elif task == "single_word":
        w = "".join(rng.choice(_SYL) for _ in range(3))
        needles, answers = [(depth, rng.choice((f"The secret word is {w}.", f"Keep this word in mind: {w}.",
                                                 f"The password for the archive is {w}.")))], [w]
        question, prefix = "What was the secret word (or password) given in the text?", "The word is"
    elif task == "single_sentence":
        a, n, v, a2, n2 = (rng.choice(_S_ADJ), rng.choice(_S_NOUN), rng.choice(_S_VERB), rng.choice(_S_ADJ),
                           rng.choice(_S_NOUN))
        start = f"the {a} {n} {v} beside the"
        needles, answers = [(depth, f"Here is a sentence to remember: {start} {a2} {n2}.")], [f"{a2} {n2}"]
        question, prefix = f"Complete the sentence to remember: \"{start} ...\"", f"The sentence is: {start}"
    elif task in ("multikey", "multivalue"):
        keys = rng.sample(_WORDS, 4)
        form = rng.choice(("One of the special magic numbers for {k} is: {v}.", "The code assigned to {k} is {v}.",
                           "{k} has the number {v}."))
        if task == "multikey":  # three distractor keys, same phrasing, at seeded depths
            answers = [_code(rng)]
            needles = [(depth, form.format(k=keys[0], v=answers[0]))]
            needles += [(rng.random(), form.format(k=k, v=_code(rng))) for k in keys[1:]]
            question, prefix = f"What is the number for {keys[0]} in the text?", f"The number for {keys[0]} is"
        else:
            answers = [_code(rng) for _ in range(4)]
            needles = [(min(1.0, max(0.0, depth + rng.uniform(-0.1, 0.1))), form.format(k=keys[0], v=a))
                       for a in answers]
            needles[0] = (depth, needles[0][1])
            question = f"What are all the numbers for {keys[0]} in the text?"
            prefix = f"The numbers for {keys[0]} are"
    elif task == "long_list":  # a long answer: twelve codes in one needle (~120 answer tokens as a numbered list), recited in order;
        # the codes after the 64th answer token are read through decode selections made after the question's
        # (the periodic exact re-scoring, RetrievalPolicy.exact_every, only matters for answers this long)
        key = rng.choice(_WORDS)
        answers = [_code(rng) for _ in range(12)]
        needles = [(depth, f"The {key} list has twelve codes: {', '.join(answers)}.")]
        question = f"Recite the twelve codes of the {key} list, in order."
        prefix = f"The twelve codes of the {key} list are:"
    elif task == "variable_tracking":
        value, other = _code(rng), _code(rng)
        names = list(dict.fromkeys(f"{rng.choice(_WORDS).upper()[:3]}{rng.randint(10, 99)}" for _ in range(12)))[:8]
        while len(names) < 8:
            names.append(f"X{len(names)}{rng.randint(100, 999)}")
        chain, dis = names[:4], names[4:]
        needles = [(min(1.0, depth + 0.03 * i), f"VAR {chain[i]} = " + (value if i == 0 else f"VAR {chain[i - 1]}") + ".")
                   for i in range(4)]
        d2 = rng.random()
        needles += [(min(1.0, d2 + 0.03 * i), f"VAR {dis[i]} = " + (other if i == 0 else f"VAR {dis[i - 1]}") + ".")
                    for i in range(4)]
        answers = chain
        question = f"Find all variables that are assigned the value {value} in the text above."
        prefix = f"The variables assigned the value {value} are:"
    else:  # two_fact: person -> locker, locker -> code (plus a distractor locker), both needed
        person = rng.choice(_PEOPLE_2)
        l1, l2 = rng.sample(range(10, 99), 2)
        v, v2 = _code(rng), _code(rng)
        d2 = rng.random()
        needles = [(depth, f"{person} keeps the spare key in locker {l1}."),
                   (d2, f"The code for locker {l1} is {v}."),
                   (rng.random(), f"The code for locker {l2} is {v2}.")]
        answers = [v]
        question = f"What is the code for the locker where {person} keeps the spare key?"
        prefix = "The code is"
        meta["second_depth"] = d2
    content, span, offs = _place(tokenizer, family, seed, head, question, needles, target_tokens)
    meta.update(haystack_span=span, needle_offsets=offs)
    return Sample(task, [{"role": "user", "content": content}], prefix, answers, depth, target_tokens, meta)


_PEOPLE_2 = ("Marguerite", "Oswin", "Tamsin", "Leopold", "Ingrid", "Cassius", "Philippa", "Rasmus")
