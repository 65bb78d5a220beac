"""bench/memory_facts.py: the fictional-fact generator of the memorize demo (issue 16 item 3)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import pytest  # noqa: E402
from memory_facts import PARAPHRASES, RELATIONS, make_facts, read_jsonl, write_jsonl  # noqa: E402


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


def test_paraphrases_are_extra_training_phrasings_only():
    plain, more = make_facts(30, seed=1), make_facts(30, seed=1, paraphrases=8)
    for a, b in zip(plain, more):
        assert b["train"][:5] == a["train"] and len(b["train"]) == 13  # appended after the 5: same indices
        assert {k: v for k, v in a.items() if k != "train"} == {k: v for k, v in b.items() if k != "train"}
        assert all(b["answer"] in t and t.find(b["subject"]) < t.find(b["answer"]) for t in b["train"][5:])
    for rel, (train, questions) in RELATIONS.items():
        extra = [t.split("Question: ")[-1].split("\n")[0] for t in PARAPHRASES[rel]]
        # no held-out question, and not memorize_quick's validation template (index 4), among them
        assert not set(extra) & set(questions)
        assert train[4].split("Question: ")[-1].split("\n")[0] not in extra
        assert len(set(PARAPHRASES[rel])) == len(PARAPHRASES[rel]) and not set(PARAPHRASES[rel]) & set(train)
    with pytest.raises(ValueError, match="paraphrases"):
        make_facts(3, paraphrases=99)


def test_jsonl_round_trip(tmp_path):
    facts = make_facts(20, seed=2)
    write_jsonl(facts, tmp_path / "f.jsonl")
    assert read_jsonl(tmp_path / "f.jsonl") == facts
