"""Sampler semantics against direct computations, and seeded reproducibility inside batches."""

import torch
from memserve.runtime import LLM, SamplingParams
from memserve.runtime.sampling import _filter_top_k_top_p, sample


def test_temperature_zero_is_argmax():
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0)] * 6
    assert sample(logits, params, [None] * 6) == logits.argmax(-1).tolist()
    # top_k=1 and a tiny nucleus are argmax too, whatever the temperature
    for p in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6)):
        gens = [torch.Generator().manual_seed(i) for i in range(6)]
        assert sample(logits, [p] * 6, gens) == logits.argmax(-1).tolist()


def test_top_k_top_p_filter_against_direct_computation():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    probs = logits.softmax(-1)  # 0.54, 0.20, 0.12, 0.07, 0.03, 0.004
    out = _filter_top_k_top_p(logits.clone(), 3, 1.0)
    assert torch.isinf(out[3:]).all() and torch.equal(out[:3], logits[:3])
    # nucleus 0.8: cumulative mass 0.54 (<0.8) 0.74 (<0.8) 0.86 -> keep the first three
    assert probs[:2].sum() < 0.8 < probs[:3].sum()
    out = _filter_top_k_top_p(logits.clone(), 0, 0.8)
    assert torch.equal(torch.isfinite(out), torch.tensor([True, True, True, False, False, False]))
    # shuffled vocab: same set kept
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    out = _filter_top_k_top_p(logits[perm].clone(), 0, 0.8)
    assert torch.equal(torch.isfinite(out), torch.isfinite(_filter_top_k_top_p(logits.clone(), 0, 0.8))[perm])


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    p = SamplingParams(temperature=2.0)
    g = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.zeros(4)
    for _ in range(n):
        counts[sample(logits, [p], [g])[0]] += 1
    expected = (logits[0] / 2.0).softmax(-1)
    assert (counts / n - expected).abs().max() < 0.03
    # top_k=2 never samples outside the top 2
    pk = SamplingParams(temperature=1.0, top_k=2)
    assert {sample(logits, [pk], [g])[0] for _ in range(200)} <= {0, 3}


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), progress=False, num_kv_blocks=256, max_num_batched_tokens=16)
    prompt = [1, 520, 3034, 314, 253, 1357]
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate([prompt], p, use_tqdm=False)[0].token_ids
    others = [SamplingParams(max_tokens=16, temperature=0.8, seed=s, ignore_eos=True) for s in range(5)]
    batch_prompts = [list(range(100, 100 + 7 * i + 3)) for i in range(5)]
    outs = llm.generate(batch_prompts[:2] + [prompt] + batch_prompts[2:], others[:2] + [p] + others[2:],
                        use_tqdm=False)
    assert outs[2].token_ids == alone
    again = llm.generate([prompt], p, use_tqdm=False)[0].token_ids
    assert again == alone
    other_seed = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50,
                                                       seed=99, ignore_eos=True), use_tqdm=False)[0].token_ids
    assert other_seed != alone
    greedy = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
                          use_tqdm=False)[0].token_ids
    assert greedy != alone  # temperature 1 with a real spread of logits is not argmax
