"""Per-model KV-memory profiles (runtime/kv_memory/profiles.py): matched by name and shape, overridable."""

import pytest
from memserve.runtime.engine import LLMEngine
from memserve.runtime.kv_memory import KVMemoryConfig
from memserve.runtime.kv_memory.profiles import PROFILES, profile_for

SMOL = dict(num_layers=30, num_kv_heads=3, head_dim=64, hidden_size=576)


def test_profile_matches_smollm2_by_name_and_shape_only():
    assert profile_for("HuggingFaceTB/SmolLM2-135M-Instruct", **SMOL).name == "smollm2-135m"
    assert profile_for("some-other-llama", **SMOL) is None  # same shape, another model
    assert profile_for("SmolLM2-135M", **{**SMOL, "num_layers": 24}) is None  # name alone is not enough
    assert profile_for("SmolLM2-135M", **SMOL, requested="none") is None
    assert profile_for("x", **SMOL, requested="smollm2-135m") is PROFILES["smollm2-135m"]
    with pytest.raises(ValueError, match="kv_memory_profile"):
        profile_for("x", **SMOL, requested="nope")


def test_engine_defaults_are_model_agnostic_and_profile_is_overridable(tiny_llama_dir):
    assert KVMemoryConfig().int4_int8_key_layers == ()  # no SmolLM2 layer indices in engine-wide defaults
    eng = LLMEngine(str(tiny_llama_dir), progress=False, kv_memory="auto")
    assert eng.memory.profile is None and eng.memory.cfg.int4_int8_key_layers == ()  # tiny model: no profile
    assert eng.memory.cfg.policy.exact == "off"  # question-time exact scoring: the SmolLM2 profile's, not global
    eng = LLMEngine(str(tiny_llama_dir), progress=False, kv_memory="auto", kv_memory_profile="smollm2-135m")
    assert eng.memory.profile == "smollm2-135m" and eng.memory.cfg.int4_int8_key_layers == (18, 19, 20, 21)
    pol = eng.memory.cfg.policy
    assert (pol.exact, pol.exact_every, pol.exact_topk, pol.topk) == ("query", 100000, 16, 8)
    assert (pol.exact_query_tokens, pol.exact_reduce, pol.exact_layer_topk) == (1, "sum", ())
    off = LLMEngine(str(tiny_llama_dir), progress=False, kv_memory="auto", kv_memory_profile="smollm2-135m",
                    kv_memory_config={"exact": "off"})
    assert off.memory.cfg.policy.exact == "off"  # the user's setting wins over the profile's
    eng = LLMEngine(str(tiny_llama_dir), progress=False, kv_memory="auto", kv_memory_profile="smollm2-135m",
                    kv_memory_config={"int4_int8_key_layers": [2]})
    assert eng.memory.cfg.int4_int8_key_layers == (2,)  # the user's kv_memory_config wins
