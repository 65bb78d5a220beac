"""Memory-layer models through the Triton kernels (issue 16): the tiny memory model's logits with the
product-key top-k and the embedding bag dispatched to `pkm_topk_triton` / `embedding_bag_triton`
(run by Triton's interpreter on CPU, TRITON_INTERPRET=1) equal the float64 reference of
test_memory_model.py within 1e-4, for replace/parallel x shared/unshared x swilu on/off and one int8
table; greedy tokens identical.

The dispatch is forced by replacing the `use_triton` rule in the two kernel modules (CPU tensors
would go to torch otherwise); a counter checks that every memory read really went through Triton.
Like tests/kernels/test_triton_interpret.py, the cases run in a fresh process started with
TRITON_INTERPRET=1 (Triton fixes interpreter mode for its own library at import)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# One combo in CI's fast set, the other seven in one slow-marked run. Measured on the shared 2-core box:
# all 8 in one process 61 s wall; split, the fast run took 31 s and the slow one 161 s wall while other
# helpers loaded the box, but 66 s of CPU for both together (the subprocess pays ~9 s of torch + Triton
# import, a case ~7 s), so on CI's idle 2 cores the fast one is ~15 s and the pair < 2 min.
FAST = ["parallel-unshared-noswilu"]  # parallel MLP + memory, per-layer tables, identity value_proj
CASE = "test_logits_through_triton_match_float64_reference"
ALL = [f"{m}-{s}-{w}" for m in ("replace", "parallel") for s in ("shared", "unshared") for w in ("swilu", "noswilu")]
ALL.append("replace-shared-swilu-int8")  # int8 rows + per-row scales: the bag kernel's in-bag dequant


def _run_in_interpreter(ids):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    nodes = [f"{__file__}::{CASE}[{i}]" for i in ids]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *nodes],
                       env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2])
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    assert f"{len(ids)} passed" in r.stdout, tail


@pytest.mark.skipif(INTERPRET, reason="this session runs the cases directly")
def test_memory_model_triton_fast_case_in_interpreter():
    _run_in_interpreter(FAST)


@pytest.mark.slow  # ~60 s CPU
@pytest.mark.skipif(INTERPRET, reason="this session runs the cases directly")
def test_memory_model_triton_other_cases_in_interpreter():
    _run_in_interpreter([i for i in ALL if i not in FAST])


if INTERPRET:
    import importlib

    import torch
    from memserve.runtime import LLM, SamplingParams

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_memory_model import COMBOS, GREEDY, reference_model, rel_err  # noqa: E402
    from tiny_models import make_tiny_memory_model, prefill_logits  # noqa: E402

    # the modules (memserve.kernels re-exports functions of the same names)
    bag_mod = importlib.import_module("memserve.kernels.embedding_bag")
    pkm_mod = importlib.import_module("memserve.kernels.pkm")

    @pytest.fixture
    def forced_triton(monkeypatch):
        """Route the memory lookup's kernels to Triton on CPU tensors; count the Triton launches."""
        calls = {"pkm": 0, "bag": 0}
        real_pkm, real_bag = pkm_mod.pkm_topk_triton, bag_mod.embedding_bag_triton

        def pkm(*a, **k):
            calls["pkm"] += 1
            return real_pkm(*a, **k)

        def bag(*a, **k):
            calls["bag"] += 1
            return real_bag(*a, **k)

        for mod in (pkm_mod, bag_mod):
            monkeypatch.setattr(mod, "use_triton", lambda *t: True)
        monkeypatch.setattr(pkm_mod, "pkm_topk_triton", pkm)
        monkeypatch.setattr(bag_mod, "embedding_bag_triton", bag)
        return calls

    @pytest.mark.parametrize("combo", COMBOS + [("replace", True, True, torch.int8)],
                             ids=lambda c: f"{c[0]}-{'shared' if c[1] else 'unshared'}-{'swilu' if c[2] else 'noswilu'}"
                                           + ("-int8" if len(c) > 3 else ""))
    def test_logits_through_triton_match_float64_reference(tmp_path, forced_triton, combo):
        mode, shared, swilu, *table_dtype = combo
        d = make_tiny_memory_model(tmp_path / "m", mode=mode, shared_values=shared, swilu=swilu,
                                   table_dtype=(table_dtype or [torch.float32])[0],
                                   value_proj=not (not shared and not swilu), seed=3,
                                   n_keys=12, knn=3, v_dim=40)  # n_keys, knn, v_dim: not powers of two
        ref = reference_model(d)
        llm = LLM(str(d), progress=False, num_kv_blocks=64)
        eng = llm.engine
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 49152, (13,), generator=g).tolist()
        got = prefill_logits(llm, ids).double()
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0]
        assert rel_err(got, want) <= 1e-4
        n_mem = len(eng.model.memory_layers)
        assert forced_triton == {"pkm": n_mem, "bag": n_mem}, forced_triton
        out = llm.generate([ids[:5]], SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)[0].token_ids
        want_ids = list(ids[:5])
        with torch.no_grad():
            for _ in range(4):
                want_ids.append(int(ref(torch.tensor([want_ids])).logits[0, -1].argmax()))
        assert out == want_ids[5:]
