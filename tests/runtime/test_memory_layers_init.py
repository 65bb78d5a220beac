"""init-memory: a parallel memory model whose greedy output equals its base's exactly (value_proj = 0)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memserve.runtime import LLM, SamplingParams  # noqa: E402
from memserve.runtime.memory_layers_init import init_memory  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402


def test_init_memory_greedy_bit_identical(tmp_path):
    base = make_tiny_model(tmp_path / "base", "llama")
    out = init_memory(str(base), str(tmp_path / "mem"), layers=[1, 2], n_keys=8, heads=2, knn=4, k_dim=16,
                      progress=False)
    sp = SamplingParams(max_tokens=12, temperature=0.0)
    a = LLM(str(base)).generate(["Hello there", "The cat"], sp, use_tqdm=False)
    m = LLM(str(out))
    assert m.engine.model.config.memory_layers.layers == [1, 2]
    b = m.generate(["Hello there", "The cat"], sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_init_memory_cli_writes_contract(tmp_path):
    import json

    from memserve.deploy.cli import main
    from safetensors.torch import load_file

    base = make_tiny_model(tmp_path / "base", "llama")
    out = tmp_path / "mem"
    assert main(["init-memory", "--base", str(base), "--layers", "0,2", "--n-keys", "8", "--heads", "2",
                 "--knn", "4", "--k-dim", "16", "--no-shared", "--out", str(out)]) == 0
    mc = json.loads((out / "config.json").read_text())["memory_layers"]
    assert mc["layers"] == [0, 2] and mc["mode"] == "parallel" and mc["shared_values"] is False
    tables = load_file(str(out / "model-00002-of-00002.safetensors"))
    assert sorted(tables) == ["model.layers.0.memory.values.weight", "model.layers.2.memory.values.weight"]
    dense = load_file(str(out / "model-00001-of-00002.safetensors"))
    assert not dense["model.layers.0.memory.value_proj.weight"].any()


def test_init_memory_cli_int8_values(tmp_path):
    import torch
    from memserve.deploy.cli import main
    from safetensors.torch import load_file

    base = make_tiny_model(tmp_path / "base", "llama")
    out = tmp_path / "mem8"
    assert main(["init-memory", "--base", str(base), "--layers", "1", "--n-keys", "8", "--heads", "2",
                 "--knn", "4", "--k-dim", "16", "--values-dtype", "int8", "--out", str(out)]) == 0
    tables = load_file(str(out / "model-00002-of-00002.safetensors"))
    assert tables["model.memory_values.weight"].dtype == torch.int8
    assert tables["model.memory_values.scales"].shape == (64,)
    sp = SamplingParams(max_tokens=6, temperature=0.0)
    m = LLM(str(out))
    assert m.engine.model_info()["memory_layers"]["table_dtype"] == "int8"
    a = LLM(str(base)).generate(["Hello there"], sp, use_tqdm=False)
    assert m.generate(["Hello there"], sp, use_tqdm=False)[0].outputs[0].token_ids == a[0].outputs[0].token_ids
