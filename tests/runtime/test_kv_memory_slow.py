"""The real default model (SmolLM2-135M-Instruct, 8k window) finds a passkey in a ~12k-token prompt:
the prompt does not fit the dense path, so the engine's default kv_memory="auto" engages the memory."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_passkey_12k_default_model():
    from long_context_tasks import make_sample, prompt_text, score
    from memserve.runtime.llm import LLM
    from memserve.runtime.sampling import SamplingParams

    llm = LLM("default", progress=False)
    tok = llm.engine.tokenizer
    sample = make_sample("passkey", tok, 12_000, 0.5, seed=0)
    ids = tok.encode(prompt_text(sample, tok))
    assert len(ids) > llm.engine.max_model_len  # beyond the dense path: memory engages by itself
    out = llm.generate([ids], SamplingParams(max_tokens=10, temperature=0.0), use_tqdm=False)[0]
    assert score(sample, out.text) == 1.0, (sample.answers, out.text)
