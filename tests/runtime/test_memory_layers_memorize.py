"""memorize: sparse value-row training teaches a tiny memory model facts; nothing else changes.

The frozen stack memorize differentiates through is checked against transformers' logits on the same
weights (an independent implementation), and the trained directory is read back by the serving
engine (LLM), so a mismatch between the training forward and the serving forward shows up as lost
recall.
"""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from memory_facts import answer_prompt, exact_match, make_facts  # noqa: E402
from memserve.runtime import LLM  # noqa: E402
from memserve.runtime.loader import load_checkpoint  # noqa: E402
from memserve.runtime.memory_layers_init import init_memory  # noqa: E402
from memserve.runtime.memory_layers_memorize import memorize  # noqa: E402
from memserve.runtime.memory_layers_stack import FrozenStack  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402

BACKGROUND = ["The grass is green and the sky is blue. " * 6,
              "A function returns a value; the caller decides what to do with it next, and so on. " * 4]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("mem")
    # hidden 128: with std-0.1 random tied embeddings, hidden 64 caps the reachable logit margin (~3) so
    # low that even a perfectly trained memory loses some argmaxes; 128 doubles it
    base = make_tiny_model(d / "base", "llama", num_hidden_layers=3, hidden_size=128, head_dim=32)
    mem = init_memory(str(base), str(d / "mem"), layers=[1], n_keys=64, heads=2, knn=4, k_dim=32, progress=False)
    return base, mem, d


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_frozen_stack_matches_transformers(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    base = make_tiny_model(tmp_path / arch, arch, num_hidden_layers=3)
    ck = load_checkpoint(str(base), progress=False)
    st = FrozenStack(ck.config, ck.weights)
    ids = torch.tensor([[5, 900, 77, 3121, 8, 40000, 12], [11, 12, 13, 14, 0, 0, 0]])
    with torch.no_grad():
        ours = st.logits(st.above(torch.nn.functional.embedding(ids, ck.weights["model.embed_tokens.weight"]), 0, {}))
        ref = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()(ids).logits
    assert torch.allclose(ours[0], ref[0], rtol=1e-4, atol=1e-4)
    assert torch.allclose(ours[1, :4], ref[1, :4], rtol=1e-4, atol=1e-4)  # right padding: real rows unchanged


def test_memorize_teaches_facts_and_changes_only_value_rows(tiny):
    from safetensors.torch import load_file

    base, mem, d = tiny
    # the three statements of each fact (the generator's QA pairs would only add conflicting reads in a
    # random 3-layer model, whose hidden states carry little context)
    facts = [dict(f, train=f["train"][:3]) for f in make_facts(6, seed=5)]
    prompts = [answer_prompt(f["train"][0], f["answer"]) for f in facts]
    answers = [f["answer"] for f in facts]
    before = sum(exact_match(LLM(str(mem)), prompts, answers))
    res = memorize(str(mem), facts, str(d / "taught"), epochs=20, top_t=64, lr=1.0, batch_size=8,
                   background=BACKGROUND, progress=False)
    after = sum(exact_match(LLM(str(res.out)), prompts, answers))
    assert before == 0 and after >= 5, (before, after, res.losses, res.value_proj_scale)

    old = load_file(str(mem / "model-00001-of-00002.safetensors"))
    new = load_file(str(res.out / "model-00001-of-00002.safetensors"))
    gate = {"model.layers.1.memory.gate.weight", "model.layers.1.memory.gate.bias"}  # new: the trained gate
    assert sorted(new) == sorted(set(old) | gate)
    assert res.gate["gate_pos_mean"] > 0.5 > res.gate["gate_neg_mean"], res.gate
    vp = "model.layers.1.memory.value_proj.weight"
    for k in old:
        if k != vp:
            assert torch.equal(old[k], new[k]), k  # base and routing bit-identical
    # set once (value_proj = 0 passes no gradient) to alpha * I, alpha = rms(residual) / rms(gate); not trained
    assert res.value_proj_scale > 1 and torch.equal(new[vp], torch.eye(128) * res.value_proj_scale)
    table = load_file(str(res.out / "model-00002-of-00002.safetensors"))["model.memory_values.weight"]
    changed = table.abs().sum(1) > 0  # the table starts at zero: a nonzero row is a written row
    assert 0 < int(changed.sum()) == res.rows_written < table.shape[0] // 2


def test_memorize_cli_int8_table(tiny, tmp_path):
    from memory_facts import write_jsonl
    from memserve.deploy.cli import main
    from safetensors.torch import load_file

    base, _, _ = tiny
    mem = init_memory(str(base), str(tmp_path / "mem8"), layers=[2], n_keys=16, heads=2, knn=4, k_dim=32,
                      values_dtype="int8", progress=False)
    write_jsonl(make_facts(3, seed=1), tmp_path / "f.jsonl")
    (tmp_path / "bg.txt").write_text("\n\n".join(BACKGROUND))
    out = tmp_path / "out"
    assert main(["memorize", str(mem), "--facts", str(tmp_path / "f.jsonl"), "--out", str(out), "--epochs", "1",
                 "--background", str(tmp_path / "bg.txt")]) == 0
    assert (out / "memorize.json").is_file()
    t = load_file(str(out / "model-00002-of-00002.safetensors"))
    assert t["model.memory_values.weight"].dtype == torch.int8 and "model.memory_values.scales" in t
    assert t["model.memory_values.weight"].any()  # rows were written (the rest stays 0)
    LLM(str(out))  # loads


def test_memorize_rejects_dense_model(tiny):
    base, _, d = tiny
    with pytest.raises(ValueError, match="init-memory"):
        memorize(str(base), make_facts(2), str(d / "x"), progress=False)


@pytest.mark.parametrize("memory_at", ["answer", "all"])
def test_step_on_cached_prefix_equals_full_forward(tiny, memory_at):
    """A step runs layers above L only on each phrasing's answer-predicting tokens, attending to keys/values
    cached from the full forward: its logits equal the full forward's at those positions (random nonzero
    tables and value_proj, so the memory speaks at every position; ragged prefixes and suffixes)."""
    from memserve.runtime.memory_layers_memorize import _build_cache, fact_examples, suffix_logits

    _, mem, _ = tiny
    ck = load_checkpoint(str(mem), progress=False)
    g = torch.Generator().manual_seed(3)
    w = dict(ck.weights)
    w["model.layers.1.memory.value_proj.weight"] = torch.randn(128, 128, generator=g) * 0.3
    tables = {"model.memory_values.weight": w.pop("model.memory_values.weight").float().clone()}
    st = FrozenStack(ck.config, w)
    ex = fact_examples(make_facts(5, seed=2), ck.tokenizer)
    assert len({e[1][0] for e in ex}) > 1 and len({len(e[1]) for e in ex}) > 1  # ragged P and S
    cache = _build_cache(st, 1, ex, tables, batch=3, progress=False, memory_at=memory_at)
    with torch.no_grad():
        for k in range(0, len(ex), 4):
            part = list(range(k, min(k + 4, len(ex))))
            ours = suffix_logits(st, 1, [cache[j] for j in part], tables)
            refs = []
            for j in part:
                seq, p = ex[j]
                full = st.logits(st.above(torch.nn.functional.embedding(torch.tensor([seq]),
                                                                        w["model.embed_tokens.weight"]), 0, tables))
                refs.append(full[0, cache[j].P:p[-1]])
                tg = cache[j].targets
                assert torch.equal(tg[tg >= 0], torch.tensor([seq[q] for q in p]))
            ref = torch.cat(refs)
            assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4), (ours - ref).abs().max()
