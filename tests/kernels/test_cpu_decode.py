"""The native (C++) decode step (kernels/cpu_decode.py) against its reference, the eager `decode_one`
(runtime/decode_step.py, itself checked against Model.forward and transformers): logits and the cache
writes of every step of a generation, fp32 and int4 linears, with q/k/v bias (Qwen2), GQA; the fallbacks."""

from __future__ import annotations

import random

import pytest
import torch
from decode_lockstep import single_lockstep
from memserve.kernels.cpu_decode import build_error, load_extension, native_decode_model
from memserve.runtime import LLM, SamplingParams
from tiny_models import make_tiny_model

torch.set_num_threads(1)

pytestmark = pytest.mark.skipif(load_extension() is None, reason=f"C++ extension not built: {build_error()}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return {arch: make_tiny_model(tmp_path_factory.mktemp("cpu_decode") / arch, arch, num_hidden_layers=3)
            for arch in ("llama", "qwen2")}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("quant", [None, "int4"])
def test_native_step_equals_eager(tiny, arch, quant):
    """Every decode step of a 40-token generation (contexts 7..46, so several KV blocks): logits and written
    k/v within 1e-6 of the eager step's (bit-identical on this project's EPYC: the reductions are the same
    torch kernels; only FMA use in the elementwise loops could differ on another CPU)."""
    # a small KV pool: every step clones it twice
    llm = LLM(str(tiny[arch]), progress=False, quantization=quant, kv_memory="off", block_size=8, num_kv_blocks=16)
    worst = single_lockstep(llm, [5, 17, 300, 40, 12, 99, 7], 40)
    assert worst["steps"] == 39
    assert worst["logits"] <= 1e-6 and worst["kv"] <= 1e-6, worst


def test_native_path_chosen_and_fallbacks(tiny):
    """decode_path="native" (the default) takes int4 / fp32 models and leaves int8 ones to the eager step;
    its tokens equal the generic forward's."""
    p = [[5, 17, 300, 40]]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    llm = LLM(str(tiny["llama"]), progress=False, kv_memory="off", num_kv_blocks=16)
    assert llm.engine.decode_step.path == "native"
    off = LLM(str(tiny["llama"]), progress=False, kv_memory="off", num_kv_blocks=16, decode_path="off")
    assert llm.generate(p, sp, use_tqdm=False)[0].token_ids == off.generate(p, sp, use_tqdm=False)[0].token_ids
    int8 = LLM(str(tiny["llama"]), progress=False, kv_memory="off", num_kv_blocks=16, quantization="int8")
    assert int8.engine.decode_step.path == "eager" and native_decode_model(int8.engine.model) is None
    eager = LLM(str(tiny["llama"]), progress=False, kv_memory="off", num_kv_blocks=16, decode_path="eager")
    assert eager.engine.decode_step.path == "eager"


def test_native_step_rejects_bad_arguments(tiny):
    llm = LLM(str(tiny["llama"]), progress=False, kv_memory="off", num_kv_blocks=4)
    ds = llm.engine.decode_step
    ds(5, 0, 0, 0, 0)  # builds the RoPE tables
    with pytest.raises(ValueError, match="slot inside"):
        ds.native.step(5, 3, ds.cos_t, ds.sin_t, ds.flat, 0, 3, 1)
    with pytest.raises(ValueError, match="token id"):
        ds.native.step(10**6, 3, ds.cos_t, ds.sin_t, ds.flat, 0, 3, 3)


@pytest.mark.slow
def test_default_model_native_equals_eager_int4():
    """The default model, int4 (its Q4_1 codes): 48 greedy tokens, every step's logits and k/v compared."""
    llm = LLM("default", progress=False, quantization="int4", kv_cache_bytes=8 << 20, kv_memory="off")
    rng = random.Random(0)
    worst = single_lockstep(llm, [rng.randrange(200, 40000) for _ in range(32)], 48)
    assert worst["logits"] <= 1e-6 and worst["kv"] <= 1e-6, worst
