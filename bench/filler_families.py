"""Haystack filler FAMILIES for the long-context tasks (issue 15): offline, deterministic by seed.

Each family is a generator of text *units* (a sentence, a paragraph, a log line, a code snippet) drawn
from `random.Random(seed)`; the task builder joins units with spaces (newlines for code/logs) until the
token budget is met. Families:

* classic     -- the Landmark/InfLLM repeated filler ("The grass is green. ..."): the old benchmark.
* prose       -- procedural varied prose: many sentence shapes, people, places, weather, events; no
                 fixed template (the text of issue 15's first failure).
* distractor  -- meeting-minutes-like text full of numbers, codes, names and dates of the needle's shape
                 (7-digit numbers, ticket/room/invoice numbers).
* stdlib      -- real English prose available offline: docstrings of a fixed list of Python stdlib
                 modules and their public members (inspect.getdoc), paragraphs in a seeded order.
* code_logs   -- procedurally generated Python-ish source and structured log lines.

The split (README, KV memory section): TUNED families may be used to choose settings; HELD_OUT ones
only to report. Never tune on HELD_OUT.
"""

from __future__ import annotations

import inspect
import random
from functools import lru_cache

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
FAMILIES = ("classic", "prose", "distractor", "stdlib", "code_logs")
TUNED = ("classic", "prose", "code_logs")
HELD_OUT = ("distractor", "stdlib")

_PEOPLE = ("Amara", "Bruno", "Chen Wei", "Dalia", "Emil", "Farah", "Gideon", "Hana", "Ivo", "Jorge", "Keiko",
           "Lars", "Mireille", "Nikhil", "Olga", "Pavel", "Quinn", "Rosa", "Sven", "Tomasz", "Uma", "Viktor",
           "Wanjiru", "Ximena", "Yusuf", "Zofia")
_ROLES = ("the baker", "a retired sailor", "the night nurse", "an old schoolteacher", "the mayor's cousin",
          "a travelling botanist", "the ferry captain", "two cyclists", "the librarian", "a street musician")
_PLACES = ("the harbor", "the hill village", "the old market", "the northern pass", "the river delta",
           "the salt flats", "the cathedral square", "the pine forest", "the lighthouse", "the train depot",
           "a mountain hut", "the lakeside inn", "the copper mine", "the botanical garden")
_WEATHER = ("a cold drizzle", "bright sunshine", "a sudden hailstorm", "thick fog", "a warm southern wind",
            "heavy snow", "a humid haze", "clear skies", "a thunderstorm", "light rain")
_TIMES = ("At dawn", "Late in the afternoon", "On the third morning", "Just before midnight", "By noon",
          "In early spring", "During the festival week", "After the long winter", "Around supper time")
_ACTS = ("repaired the fishing nets", "argued about the price of bread", "painted the fence blue",
         "waited for the delayed bus", "sang old songs", "counted the sheep twice", "mapped the valley",
         "planted rows of beans", "read letters aloud", "traded spices for wool", "rebuilt the stone wall")
_THINGS = ("a brass compass", "a basket of figs", "an unsigned letter", "a broken violin", "three clay jars",
           "a faded photograph", "a bundle of maps", "a jar of honey", "a wooden chess set")
_ADJ = ("quiet", "crowded", "muddy", "golden", "windswept", "narrow", "ancient", "noisy", "peaceful", "damp")


def _prose(rng: random.Random) -> str:
    p, q, pl, pl2 = rng.choice(_PEOPLE), rng.choice(_PEOPLE), rng.choice(_PLACES), rng.choice(_PLACES)
    shapes = (
        lambda: f"{rng.choice(_TIMES)}, {p} {rng.choice(_ACTS)} near {pl}.",
        lambda: f"The road to {pl} was {rng.choice(_ADJ)}, and {rng.choice(_WEATHER)} followed us all day.",
        lambda: f"{p} told {q} that {rng.choice(_ROLES)} had left {rng.choice(_THINGS)} at {pl2}.",
        lambda: f"Nobody at {pl} remembered why {rng.choice(_ROLES)} {rng.choice(_ACTS)}.",
        lambda: f"We reached {pl} in {rng.choice(_WEATHER)}; {p} insisted on walking on to {pl2}.",
        lambda: f"Was it {p} or {q} who first noticed {rng.choice(_THINGS)} in {pl}?",
        lambda: f"{rng.choice(_TIMES)} the square was {rng.choice(_ADJ)} and smelled of smoke and rain.",
        lambda: f"\"{rng.choice(('Keep going', 'Not yet', 'Look there', 'Listen'))},\" said {p}, pointing toward {pl}.",
        lambda: f"{q}, who had grown up near {pl}, {rng.choice(_ACTS)} while the others slept.",
        lambda: f"Because of {rng.choice(_WEATHER)}, the market at {pl} closed early and {p} went home.",
        lambda: f"In the diary, {p} wrote only this: {rng.choice(_ADJ)} day, {rng.choice(_ADJ)} evening.",
        lambda: f"{rng.choice(_ROLES).capitalize()} {rng.choice(_ACTS)}, then {rng.choice(_ACTS)}.",
    )
    return rng.choice(shapes)()


def _num7(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _distractor(rng: random.Random) -> str:
    p, q = rng.choice(_PEOPLE), rng.choice(_PEOPLE)
    date = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    shapes = (
        lambda: f"Ticket {_num7(rng)} was reassigned to {p} on {date}.",
        lambda: f"{p} booked room {rng.randint(100, 999)} for the review of invoice {_num7(rng)}.",
        lambda: f"Action item: {q} to confirm purchase order {_num7(rng)} by {date}.",
        lambda: f"The reference number for the {rng.choice(_ADJ)} shipment is {_num7(rng)}, per {p}.",
        lambda: f"Budget line {rng.randint(10, 99)}-{rng.randint(1000, 9999)} rose by {rng.randint(2, 40)}% since {date}.",
        lambda: f"{p} reported that account {_num7(rng)} and account {_num7(rng)} were merged.",
        lambda: f"Minutes of {date}: present {p}, {q}; the vendor code {rng.choice('ABCDEFGH')}{_num7(rng)} was approved.",
        lambda: f"Call {q} at extension {rng.randint(1000, 9999)} about badge {_num7(rng)}.",
        lambda: f"The number to quote for the {rng.choice(_THINGS)[2:]} claim is {_num7(rng)}.",
        lambda: f"Agenda item {rng.randint(1, 12)}: {p} presented the figures for quarter {rng.randint(1, 4)}.",
    )
    return rng.choice(shapes)()


# A fixed list (no installed-package scanning: stays the same across machines with this Python).
_STDLIB_MODULES = ("argparse", "collections", "functools", "itertools", "json", "pathlib", "random", "re",
                   "string", "textwrap", "datetime", "calendar", "statistics", "fractions", "decimal", "heapq",
                   "bisect", "shutil", "tempfile", "logging", "csv", "difflib", "enum", "dataclasses",
                   "contextlib", "threading", "queue", "subprocess", "socket", "email", "html", "urllib",
                   "zipfile", "tarfile", "gzip", "hashlib", "hmac", "secrets", "uuid", "typing", "inspect",
                   "pprint", "copy", "pickle", "sqlite3", "unittest", "doctest", "wave", "locale")


@lru_cache(maxsize=1)
def stdlib_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs from the docstrings of _STDLIB_MODULES (module + public members), in a fixed order.

    Paragraphs with few letters (tables, code) and ones with 4+ digit runs (they look like needles) are dropped.
    """
    import importlib

    out: list[str] = []
    for name in _STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # pragma: no cover - a module missing on a stripped Python
            continue
        objs = [mod] + [getattr(mod, k) for k in sorted(vars(mod)) if not k.startswith("_")]
        for obj in objs:
            if obj is not mod and getattr(obj, "__module__", name) != name:
                continue
            doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isfunction(obj) or obj is mod) else None
            for para in (doc or "").split("\n\n"):
                para = " ".join(para.split())
                letters = sum(c.isalpha() for c in para)
                if len(para) < 60 or letters < 0.7 * len(para) or ">>>" in para:
                    continue
                if any(para[i:i + 4].isdigit() for i in range(len(para) - 3)):
                    continue
                out.append(para)
    return tuple(dict.fromkeys(out))


def _stdlib_stream(rng: random.Random):
    paras = stdlib_paragraphs()
    i = rng.randrange(len(paras))
    step = rng.choice([p for p in (7, 11, 13, 17, 19, 23) if len(paras) % p])  # a seeded permutation walk
    while True:  # sentence units (a needle can sit between sentences), paragraphs in seeded order
        sents = paras[i].replace(". ", ".\x00").split("\x00")
        yield from sents
        i = (i + step) % len(paras)


_FUNCS = ("load", "parse", "merge", "flush", "resolve", "render", "encode", "retry", "schedule", "evict")
_NOUNS = ("config", "batch", "token", "segment", "record", "header", "buffer", "session", "chunk", "index")
_LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR")


def _code_logs(rng: random.Random) -> str:
    f, n, m = rng.choice(_FUNCS), rng.choice(_NOUNS), rng.choice(_NOUNS)
    if rng.random() < 0.5:
        ts = (f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:"
              f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z")
        return (f"{ts} {rng.choice(_LEVELS)} worker-{rng.randint(0, 15)} {f}_{n} req={rng.getrandbits(32):08x} "
                f"latency_ms={rng.randint(1, 900)} status={rng.choice((200, 200, 204, 404, 500))}")
    shapes = (
        lambda: f"def {f}_{n}({m}, *, timeout={rng.randint(1, 60)}):\n    \"\"\"{f.capitalize()} the {n} from {m}.\"\"\"\n"
                f"    if {m} is None:\n        raise ValueError(\"{m} must be set\")\n    return _{f}({m}.{n}s, timeout)",
        lambda: f"class {n.capitalize()}{f.capitalize()}er:\n    def __init__(self, {m}):\n        self.{m} = {m}\n"
                f"        self.count = {rng.randint(0, 9)}",
        lambda: f"for {n} in {m}s:\n    if not {n}.ok:\n        log.warning(\"skip %s\", {n}.name)\n        continue\n"
                f"    {f}({n})",
        lambda: f"# {f} every {n} before the {m} is closed; see issue {rng.randint(10, 999)}",
        lambda: f"{n}_{m} = {{\"{f}\": {rng.randint(0, 99)}, \"limit\": {rng.randint(100, 999)}}}",
    )
    return rng.choice(shapes)()


def units(family: str, seed: int):
    """Infinite iterator of filler units of `family` for `seed` (same seed -> same text)."""
    assert family in FAMILIES, f"family must be one of {FAMILIES}"
    rng = random.Random(f"filler:{family}:{seed}")
    if family == "stdlib":
        yield from _stdlib_stream(rng)
    gen = {"classic": lambda r: FILLER, "prose": _prose, "distractor": _distractor, "code_logs": _code_logs}[family]
    while True:
        yield gen(rng)


def joiner(family: str) -> str:
    """Unit separator: newlines for code/logs, spaces for prose."""
    return "\n" if family == "code_logs" else " "
