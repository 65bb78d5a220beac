"""bench/memory_facts.py: the fictional-fact generator of the memorize demo (issue 16 item 3)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from memory_facts import RELATIONS, make_facts, read_jsonl, write_jsonl  # noqa: E402


def test_deterministic_by_seed():
    assert make_facts(60, seed=3) == make_facts(60, seed=3)
    assert make_facts(60, seed=3) != make_facts(60, seed=4)


def test_answers_and_subjects_unique():
    facts = make_facts(1000, seed=0)
    assert len({f["answer"] for f in facts}) == 1000
    assert len({f["subject"] for f in facts}) == 1000


def test_questions_distinct_from_training_phrasings():
    for train, questions in RELATIONS.values():
        assert not set(train) & set(questions)
    for f in make_facts(200, seed=1):
        assert all(f["answer"] in t for t in f["train"])
        assert not any(f["answer"] in q for q in f["questions"])  # questions do not leak the answer
        assert not set(f["train"]) & set(f["questions"])


def test_jsonl_round_trip(tmp_path):
    facts = make_facts(20, seed=2)
    write_jsonl(facts, tmp_path / "f.jsonl")
    assert read_jsonl(tmp_path / "f.jsonl") == facts
