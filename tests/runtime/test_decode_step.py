"""The single-stream decode step (runtime/decode_step.py): same tokens and logits as Model.forward
(decode_path="off", itself checked against transformers in test_model.py), the fallbacks, and compiled ==
eager."""

from __future__ import annotations

import pytest
import torch
from memserve.runtime import LLM, SamplingParams
from memserve.runtime import engine as eng_mod
from memserve.runtime.engine import EngineArgs
from tiny_models import make_tiny_model

eng_mod_sample = eng_mod.sample

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("decode_step") / "m", "llama", num_hidden_layers=2)


def _run(path, prompts, n=20, **kw):
    """(llm, outputs, the logits of every sampling step)."""
    llm = LLM(str(path), progress=False, **kw)
    logits = []

    def keep(lg, *a):
        logits.append(lg.clone())
        return eng_mod_sample(lg, *a)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eng_mod, "sample", keep)
        outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
    return llm, outs, torch.cat(logits)


@pytest.mark.parametrize("quant", [None, "int4"])
def test_fast_decode_equals_forward(tiny, quant):
    """Greedy tokens identical and logits within 1e-4 of Model.forward over 20 decode steps, eager and native
    steps, with the KV memory on (dense sequences take the fast path) and off."""
    prompts = [[5, 17, 300, 40, 12, 99, 7]]
    for kv_memory in ("off", "auto"):
        ref_llm, ref, ref_lg = _run(tiny, prompts, quantization=quant, decode_path="off", kv_memory=kv_memory)
        assert ref_llm.engine.decode_step is None
        for path in ("eager", "native"):  # native: kernels/cpu_decode.py (eager where it cannot build)
            llm, out, lg = _run(tiny, prompts, quantization=quant, decode_path=path, kv_memory=kv_memory)
            assert llm.engine.decode_step is not None
            assert out[0].token_ids == ref[0].token_ids
            assert (lg - ref_lg).abs().max() < 1e-4 * ref_lg.abs().max()


def test_fast_decode_falls_back_on_scattered_blocks(tiny):
    """A lone sequence whose blocks are not consecutive (it grew while another held the next block) is
    decoded by Model.forward, and gives the tokens of a run on its own."""
    llm = LLM(str(tiny), progress=False, kv_memory="off", block_size=4)
    eng = llm.engine
    results = []
    orig = eng._decode_one
    eng._decode_one = lambda s, tok: results.append(orig(s, tok)) or results[-1]
    eng.add_request("a", [5, 6, 7], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    eng.add_request("b", [8, 9, 10, 11, 12], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.token_ids
    alone = _run(tiny, [[5, 6, 7]], 12, kv_memory="off", block_size=4, decode_path="off")[1][0].token_ids
    assert done["a"] == alone
    assert results and all(r is None for r in results)  # the lone steps all fell back


def test_bad_decode_path():
    with pytest.raises(AssertionError, match="decode_path"):
        EngineArgs(decode_path="jit")


@pytest.mark.slow
def test_compiled_decode_equals_eager(tiny):
    """torch.compile'd decode step: the same greedy tokens as eager, logits within 1e-4 (inductor may
    reorder float reductions), compile seconds reported."""
    _, eager, elg = _run(tiny, [[5, 17, 300, 40]], 12, kv_memory="off", quantization="int4")
    llm, comp, clg = _run(tiny, [[5, 17, 300, 40]], 12, kv_memory="off", quantization="int4", decode_path="compile")
    assert llm.engine.decode_compile_seconds is not None and llm.engine.decode_compile_seconds > 0
    assert comp[0].token_ids == eager[0].token_ids
    assert (clg - elg).abs().max() < 1e-4 * elg.abs().max()
