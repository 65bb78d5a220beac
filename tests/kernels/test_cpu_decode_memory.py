"""The native (C++) decode step on memory-layer models (issue 16): the C++ step runs each layer up to its FFN
and calls a memory layer's Python FFN slot through a hook. Every decode step of a generation is compared with
the eager `decode_one` (itself the same math as Model.forward): logits and cache writes, for every
mode x shared x swilu combination of the tiny memory models, int8 tables and int4 linears; greedy tokens
equal Model.forward's (decode_path="off"); lookups are counted once per memory layer per step."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
from memserve.kernels.cpu_decode import build_error, load_extension
from memserve.runtime import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decode_lockstep import batched_lockstep, single_lockstep  # noqa: E402
from tiny_models import make_tiny_memory_model  # noqa: E402

torch.set_num_threads(1)

pytestmark = pytest.mark.skipif(load_extension() is None, reason=f"C++ extension not built: {build_error()}")

COMBOS = list(itertools.product(["replace", "parallel"], [True, False], [True, False]))
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
PROMPT = [5, 17, 300, 40, 12, 99, 7]


@pytest.mark.parametrize("mode,shared,swilu", COMBOS)
def test_native_memory_step_equals_eager_and_forward(tmp_path, mode, shared, swilu):
    d = make_tiny_memory_model(tmp_path / "m", mode=mode, shared_values=shared, swilu=swilu,
                               value_proj=shared or swilu, seed=3)
    kw = dict(progress=False, kv_memory="off", block_size=8, num_kv_blocks=16)
    llm = LLM(str(d), **kw)
    worst = single_lockstep(llm, PROMPT, 24)
    assert worst["steps"] == 23
    assert worst["logits"] <= 1e-6 and worst["kv"] <= 1e-6, worst
    assert worst["reads"] == {2}  # the tiny models' two memory layers, once each per step
    # the default engine (native step) emits Model.forward's greedy tokens
    native = LLM(str(d), **kw)
    assert native.engine.decode_step.path == "native"
    off = LLM(str(d), decode_path="off", **kw)
    a = native.generate([PROMPT], GREEDY, use_tqdm=False)[0].token_ids
    assert a == off.generate([PROMPT], GREEDY, use_tqdm=False)[0].token_ids


@pytest.mark.parametrize("table_dtype,quant", [(torch.int8, None), (torch.float32, "int4"), (torch.bfloat16, None)])
def test_native_memory_step_int8_table_int4_linears(tmp_path, table_dtype, quant):
    d = make_tiny_memory_model(tmp_path / "m", mode="parallel", table_dtype=table_dtype, seed=5)
    kw = dict(progress=False, kv_memory="off", block_size=8, num_kv_blocks=16, quantization=quant)
    worst = single_lockstep(LLM(str(d), **kw), PROMPT, 16)
    assert worst["logits"] <= 1e-6 and worst["kv"] <= 1e-6, worst
    a = LLM(str(d), **kw).generate([PROMPT], GREEDY, use_tqdm=False)[0].token_ids
    assert a == LLM(str(d), decode_path="off", **kw).generate([PROMPT], GREEDY, use_tqdm=False)[0].token_ids


def test_memory_layer_zero_is_hooked(tmp_path):
    """A replace-mode memory at layer 0 (no MLP there): the C++ step sizes its MLP buffers from the other layers."""
    d = make_tiny_memory_model(tmp_path / "m", mode="replace", layers=[0], seed=4)
    kw = dict(progress=False, kv_memory="off", block_size=8, num_kv_blocks=16)
    worst = single_lockstep(LLM(str(d), **kw), PROMPT, 12)
    assert worst["logits"] <= 1e-6 and worst["reads"] == {1}, worst


# ---- the batched native step (kernels/cpu_decode_batched.py) with the same FFN hook ---------------------------

PROMPTS = [[5, 17, 300, 40, 12, 99, 7], [3, 1000], list(range(100, 131)), [42] * 12]


@pytest.mark.parametrize("mode,shared,swilu", COMBOS)
def test_batched_memory_step_equals_forward(tmp_path, mode, shared, swilu):
    """4 sequences of different lengths (the batch shrinks 4 -> 1 as they finish): logits and cache writes within
    1e-5 of Model.forward's (the batched step's own RMSNorm / attention round differently: the tolerance of
    tests/kernels/test_cpu_decode_batched.py for fp32 linears); each memory layer read once per step; greedy
    tokens equal decode_path="off"."""
    from memserve.kernels.cpu_decode_batched import load_extension as load_batched

    if load_batched() is None:
        pytest.skip("batched C++ step not built")
    d = make_tiny_memory_model(tmp_path / "m", mode=mode, shared_values=shared, swilu=swilu,
                               value_proj=shared or swilu, seed=3)
    kw = dict(progress=False, kv_memory="off", block_size=8, num_kv_blocks=64)
    llm = LLM(str(d), **kw)
    assert llm.engine.decode_step.batched is not None
    worst = batched_lockstep(llm, PROMPTS, [20, 12, 20, 6])[0]
    assert max(worst["batches"]) == 4 and 2 in worst["batches"]
    assert worst["logits"] <= 1e-5 and worst["kv"] <= 1e-5, worst
    assert worst["reads"] == {2}
    sps = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (20, 12, 20, 6)]
    a = [o.token_ids for o in LLM(str(d), **kw).generate(PROMPTS, sps, use_tqdm=False)]
    assert a == [o.token_ids for o in LLM(str(d), decode_path="off", **kw).generate(PROMPTS, sps, use_tqdm=False)]
