"""Offline long-context task generators (bench/long_context_tasks.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from long_context_tasks import FILLER, TASKS, make_sample, prompt_text, score  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    from memserve.runtime.tokenizer import load_default_tokenizer

    return load_default_tokenizer()


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_sample_length_depth_and_answers(tok, task, depth):
    s = make_sample(task, tok, 1500, depth, seed=3)
    text = s.messages[0]["content"]
    n = len(tok.encode(text))
    assert 1300 <= n <= 1500, n
    for a in s.answers:
        assert a in text
    if task in ("passkey", "niah_single"):
        pos = text.index(s.answers[0]) / len(text)
        assert abs(pos - depth) < 0.1, (pos, depth)
    assert FILLER in text
    assert score(s, " ".join(s.answers)) == 1.0 and score(s, "no idea") == 0.0
    assert prompt_text(s, tok).endswith(s.answer_prefix)
    # deterministic per (task, length, depth, seed)
    assert make_sample(task, tok, 1500, depth, seed=3).answers == s.answers


def test_passkey_uses_the_landmark_filler(tok):
    s = make_sample("passkey", tok, 600, 0.3, seed=0)
    assert "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again." in \
        s.messages[0]["content"]
    assert f"The pass key is {s.answers[0]}. Remember it. {s.answers[0]} is the pass key." in s.messages[0]["content"]
