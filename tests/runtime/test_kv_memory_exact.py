"""RetrievalPolicy(exact="query"): the selection of the prompt's last chunk (and, with exact_every, of
decode) scores every block by the exact max q.k over all its stored keys (kernel op on the int codes)."""

import pytest
import torch
from kv_memory_testlib import HKV, HQ, D, attend_in_chunks
from kv_memory_testlib import random_qkv as _qkv
from memserve.runtime.kv_memory import (
    KVLayerStore,
    KVMemoryConfig,
    default_inv_freq,
    reference_attention,
    rotate,
)
from memserve.runtime.kv_memory.quant import dequantize, exact_block_scores, quantize
from memserve.scheduler.kv_policy import RetrievalPolicy


def _run(mem, q, k, v, chunks, inv, scale, p=0):
    return attend_in_chunks(mem, q, k, v, chunks, inv, scale, p)


@pytest.mark.parametrize("kind,exact_keys", [("int4", 0), ("int8", 0), ("int4", 3), ("fp16", 0), ("none", 0)])
def test_exact_scores_equal_float64_max_over_dequantized_keys(kind, exact_keys):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, HKV, 32, D, generator=g) * 2 + 0.5  # (NB, Hkv, bs, D) blocks
    idx = torch.randperm(32, generator=g)[:exact_keys].expand(9, HKV, exact_keys).contiguous()
    kq = quantize(x, kind, per_channel=True, group=16, exact_idx=idx if exact_keys else None)
    q = torch.randn(HQ, D, generator=g)
    got = exact_block_scores(kq, q, 16)
    kd = dequantize(kq, None, per_channel=True, group=16).double()  # exact rows written over their codes
    ref = torch.einsum("hgd,nhtd->hgnt", q.double().view(HKV, HQ // HKV, D), kd).amax(-1).reshape(HQ, -1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exact_every", [0, 1])
@pytest.mark.parametrize("chunks", [[100, 1], [37, 100, 5, 64]])
def test_every_block_selected_with_exact_scoring_is_still_dense(chunks, exact_every):
    t, n_init, n_local, bs = 420, 8, 64, 16
    cfg = KVMemoryConfig(n_init=n_init, n_local=n_local, block_size=bs, compression="none",
                         policy=RetrievalPolicy(topk=10_000, exact="query", exact_every=exact_every,
                                                reselect_every=3))
    q, k, v = _qkv(t, seed=1)
    inv, scale = default_inv_freq(D, 10000.0), D**-0.5
    mem = KVLayerStore(cfg, 0, HKV, D)
    mem.prompt_end = 350  # a chunk ends past it: that one is scored exactly
    out = torch.cat(_run(mem, q, k, v, chunks, inv, scale))
    assert mem.num_blocks > 15
    torch.testing.assert_close(out, reference_attention(q, k, v, inv, scale, n_init, n_local), rtol=1e-9, atol=1e-9)


def _needle_case(seed=3):
    """A body whose block 12 holds one key aligned with the last query; nothing in the body attends it
    (its attention received in the window is ~0), so its block's representatives miss it."""
    t, bs, n_init, n_local = 600, 16, 8, 64
    q, k, v = _qkv(t, seed=seed, dtype=torch.float32)
    inv = default_inv_freq(D, 10000.0)
    direction = torch.randn(D, generator=torch.Generator().manual_seed(9))
    direction = direction / direction.norm()
    needle = n_init + 12 * bs + 5
    k[needle] = 6 * direction
    q[:-10] *= 0.3
    # the question (last 10 tokens): queries that, rotated at n_local as the far keys are, point at the needle
    q[-10:] = 4 * rotate(direction.expand(1, HQ, D), torch.tensor([-n_local]), inv)[0]
    return q, k, v, inv, D**-0.5, dict(n_init=n_init, n_local=n_local, block_size=bs, key_group=16), needle


def test_exact_query_picks_the_needle_block_the_representatives_miss_and_leaves_the_body_bit_exact():
    q, k, v, inv, scale, shape, needle = _needle_case()
    outs, picks = {}, {}
    for mode in ("off", "query"):
        cfg = KVMemoryConfig(**shape, compression="int4", repr_topk=1,
                             policy=RetrievalPolicy(topk=1, next_blocks=0, exact=mode))
        mem = KVLayerStore(cfg, 0, HKV, D)
        mem.prompt_end = q.shape[0]
        outs[mode] = _run(mem, q, k, v, [50] * 11 + [40, 10], inv, scale)
        blk = int(((mem.block_pos.get() <= needle) & (mem.block_pos.get() + 16 > needle)).nonzero())
        picks[mode] = bool(mem.sticky[:, blk].all())  # the last (question) chunk's pick, kept for decode
    assert picks == {"off": False, "query": True}
    for a, b in zip(outs["off"][:-1], outs["query"][:-1]):  # body chunks: the same scores, bit-exact
        assert torch.equal(a, b)
    assert not torch.equal(outs["off"][-1], outs["query"][-1])


def test_option_off_is_bit_exact_to_the_default_policy_and_prompt_end_alone_changes_nothing():
    q, k, v, inv, scale, shape, _ = _needle_case(seed=5)
    res = []
    for pol, end in ((RetrievalPolicy(), None), (RetrievalPolicy(exact="off", exact_every=4), q.shape[0]),
                     (RetrievalPolicy(exact="query"), None)):  # exact, but no known prompt end: never due
        mem = KVLayerStore(KVMemoryConfig(**shape, compression="int4", policy=pol), 0, HKV, D)
        mem.prompt_end = end
        res.append(torch.cat(_run(mem, q, k, v, [50, 50, 1], inv, scale)))
    assert torch.equal(res[0], res[1]) and torch.equal(res[0], res[2])


def test_policy_rejects_bad_exact_settings():
    with pytest.raises(AssertionError, match="exact must be one of"):
        RetrievalPolicy(exact="always")
    with pytest.raises(AssertionError, match="exact_every"):
        RetrievalPolicy(exact_every=-1)


# a tiny engine's KV memory with question-time exact scoring (the two engine tests below)
ENGINE_EXACT_CFG = {"n_init": 4, "n_local": 32, "block_size": 8, "repr_topk": 2, "chunk_size": 24, "key_group": 8,
                    "value_group": 8, "topk": 2, "compression": "int4", "exact": "query"}


def _count_exact_scorings(monkeypatch) -> list[int]:
    """The number of blocks of each exact scoring the memory makes (working_set.exact_block_scores calls)."""
    from memserve.runtime.kv_memory import working_set

    calls: list[int] = []
    orig = working_set.exact_block_scores
    monkeypatch.setattr(working_set, "exact_block_scores",
                        lambda kq, q, group: calls.append(kq.data.shape[0]) or orig(kq, q, group))
    return calls


def test_engine_scores_exactly_only_the_chunk_that_ends_the_prompt(tiny_llama_dir, monkeypatch):
    """Through the engine (backend -> prompt_end): with exact_every 0 only the last prefill chunk of each
    layer is scored exactly (once per layer), body chunks and decode keep the representatives."""
    from memserve.runtime.engine import LLMEngine
    from memserve.runtime.sampling import SamplingParams

    calls = _count_exact_scorings(monkeypatch)
    cfg = dict(ENGINE_EXACT_CFG)
    eng = LLMEngine(str(tiny_llama_dir), progress=False, kv_memory="retrieval", kv_memory_config=cfg)
    prompt = torch.randint(5, 1000, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    eng.add_request("r", prompt, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    assert len(calls) == eng.config.num_hidden_layers  # one exact scoring per layer, none in decode
    # chunks of 24: the last starts at 288, when (288 - n_init - n_local) // 8 = 31 blocks are packed
    assert set(calls) == {31}


@pytest.mark.parametrize("exact_every,expected", [(0, 1), (1, None), (40, 4)])
def test_exact_every_counts_the_exact_scorings_of_decode(exact_every, expected, monkeypatch):
    """Question chunk: exact. exact_every N > 0: the first decode selection too, then one once N decode steps
    passed (fresh selections every reselect_every 4 steps here); N = 1: every fresh selection."""
    from memserve.runtime.kv_memory import working_set

    calls = []
    orig = working_set.exact_block_scores
    monkeypatch.setattr(working_set, "exact_block_scores", lambda *a: calls.append(1) or orig(*a))
    q, k, v, inv, scale, shape, _ = _needle_case(seed=6)
    pol = RetrievalPolicy(exact="query", exact_every=exact_every, reselect_every=4)
    mem = KVLayerStore(KVMemoryConfig(**shape, compression="int4", policy=pol), 0, HKV, D)
    mem.prompt_end = 500
    _run(mem, q, k, v, [50] * 10 + [1], inv, scale)  # 100 decode steps after the 500-token prompt
    if expected is None:  # every fresh decode selection: at least 100 / reselect_every of them
        assert len(calls) >= 1 + 100 // 4
    else:
        assert len(calls) == expected  # 40: question, decode step 1, then ~steps 44 and 84


def test_exact_topk_widens_only_the_exact_selections():
    q, k, v, inv, scale, shape, _ = _needle_case(seed=7)
    pol = RetrievalPolicy(topk=1, next_blocks=0, exact="query", exact_topk=3)
    mem = KVLayerStore(KVMemoryConfig(**shape, compression="int4", policy=pol), 0, HKV, D)
    mem.prompt_end = q.shape[0]
    body = _run(mem, q[:-10], k[:-10], v[:-10], [50], inv, scale)
    assert int(mem.sticky.sum(1).max()) == 1  # body chunks: topk
    mem.attend(q[-10:], k[-10:], v[-10:], q.shape[0] - 10, inv, scale)
    assert mem.sticky.sum(1).tolist() == [3] * HQ  # the question's chunk: exact_topk
    ref = KVLayerStore(KVMemoryConfig(**shape, compression="int4", policy=RetrievalPolicy(topk=1, next_blocks=0)),
                       0, HKV, D)
    for a, b in zip(body, _run(ref, q[:-10], k[:-10], v[:-10], [50], inv, scale)):
        assert torch.equal(a, b)


def test_ingest_marks_no_prompt_end_so_a_document_in_pieces_equals_one_prompt(tiny_llama_dir, monkeypatch):
    """An ingest is a document, not a question: only the continuing request's last chunk is scored exactly, and a
    document ingested in chunk-aligned pieces then questioned gives the one-shot answer (bench/longctx_grid.py
    resumes its long cells this way)."""
    from memserve.runtime.engine import LLMEngine
    from memserve.runtime.sampling import SamplingParams

    calls = _count_exact_scorings(monkeypatch)
    cfg = dict(ENGINE_EXACT_CFG)
    g = torch.Generator().manual_seed(3)
    doc, question = torch.randint(5, 1000, (240,), generator=g).tolist(), torch.randint(5, 1000, (12,), generator=g).tolist()
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    def answer(eng, prompt, sid=None):
        eng.add_request("q", prompt, params, session_id=sid)
        out = None
        while eng.has_unfinished():
            out = next((o for o in eng.step() if o.request_id == "q"), out)
        return out.token_ids

    one = answer(LLMEngine(str(tiny_llama_dir), progress=False, kv_memory="retrieval", kv_memory_config=cfg,
                           max_num_batched_tokens=48), doc + question)
    n_one, calls[:] = len(calls), []
    eng = LLMEngine(str(tiny_llama_dir), progress=False, kv_memory="retrieval", kv_memory_config=cfg,
                    max_num_batched_tokens=48)
    for a, b in ((0, 96), (96, 240)):  # two pieces, both ends on a 24-token chunk boundary
        list(eng.ingest("s", doc[a:b]))
    assert calls == []  # no exact scoring while ingesting
    assert answer(eng, question, "s") == one
    assert len(calls) == n_one == eng.config.num_hidden_layers  # the question's chunk only
