"""Question-time exact selection options (issue 15 item 3): which query scores the blocks at the question's
chunk (`exact_query_tokens`), how a KV head combines its query heads' scores (`exact_reduce`), and per-layer
top-k at the exact selections (`exact_layer_topk`). Each is checked against a small float64 reference."""

import pytest
import torch
from kv_memory_testlib import HKV, HQ, D, attend_in_chunks, random_qkv
from memserve.runtime.kv_memory import (
    KVLayerStore,
    KVMemoryConfig,
    default_inv_freq,
    reference_attention,
    rotate,
)
from memserve.runtime.kv_memory.quant import dequantize
from memserve.runtime.kv_memory.selection import select_blocks
from memserve.scheduler.kv_policy import RetrievalPolicy

G = HQ // HKV
SHAPE = dict(n_init=8, n_local=64, block_size=16, key_group=16)


def _qkv(t, seed=0, dtype=torch.float32):
    return random_qkv(t, seed, dtype)


def _run(mem, q, k, v, chunks, inv, scale, p=0):
    return attend_in_chunks(mem, q, k, v, chunks, inv, scale, p)


def _question_case(seed=11):
    """A 600-token prompt whose last chunk (550..600) is mostly text pointing at a decoy block (block 5), and
    whose last token points at the needle (block 20): the chunk's mean query ranks the decoy first, the last
    token's ranks the needle first."""
    q, k, v = _qkv(600, seed=seed)
    inv = default_inv_freq(D, 10000.0)
    gen = torch.Generator().manual_seed(seed + 1)
    needle_dir, decoy_dir = (x / x.norm() for x in torch.randn(2, D, generator=gen))
    n0, bs = SHAPE["n_init"], SHAPE["block_size"]
    k[n0 + 20 * bs + 3] = 6 * needle_dir
    k[n0 + 5 * bs + 7] = 6 * decoy_dir
    q[:-1] *= 0.3
    glob = torch.tensor([-SHAPE["n_local"]])  # far keys are scored with the query rotated at n_local
    q[550:-1] += 3 * rotate(decoy_dir.expand(1, HQ, D), glob, inv)[0]
    q[-1] = 4 * rotate(needle_dir.expand(1, HQ, D), glob, inv)[0]
    return q, k, v, inv, D**-0.5


def _reference_picks(mem, q_rows, k: int, reduce: str = "sum") -> set[tuple[int, int]]:
    """float64: the question's query (mean of q_rows, rotated at n_local) against every dequantized stored
    key; per KV head the top-k blocks of its query heads' scores combined by `reduce`."""
    inv = default_inv_freq(D, 10000.0)
    qg = rotate(q_rows.double(), torch.full((q_rows.shape[0],), SHAPE["n_local"]), inv.double()).mean(0)
    keys = dequantize(mem._stored()[0], None, per_channel=True, group=SHAPE["key_group"]).double()
    s = torch.einsum("hgd,nhtd->hgnt", qg.view(HKV, G, D), keys).amax(-1)  # (Hkv, G, NB)
    if reduce == "sum":
        agg = s.sum(1)
    elif reduce == "max":
        agg = s.amax(1)
    else:
        agg = ((s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True)).sum(1)
    return {(h, int(b)) for h in range(HKV) for b in agg[h].topk(k).indices}


def _sticky_picks(mem) -> set[tuple[int, int]]:
    rows = mem.sticky.view(HKV, G, -1)[:, 0]
    return {(h, int(b)) for h, b in rows.nonzero().tolist()}


def _store(pol, layer=0):
    return KVLayerStore(KVMemoryConfig(**SHAPE, compression="int4", policy=pol), layer, HKV, D)


@pytest.mark.parametrize("n_tokens", [0, 1, 4])
def test_exact_query_tokens_scores_with_the_last_prompt_queries(n_tokens):
    q, k, v, inv, scale = _question_case()
    mem = _store(RetrievalPolicy(topk=2, next_blocks=0, exact="query", exact_query_tokens=n_tokens))
    mem.prompt_end = 600
    _run(mem, q, k, v, [50], inv, scale)
    rows = q[550:600] if n_tokens == 0 else q[600 - n_tokens : 600]
    assert _sticky_picks(mem) == _reference_picks(mem, rows, 2)
    needle_first = {(h, 20) for h in range(HKV)} <= _sticky_picks(mem)
    if n_tokens < 2:  # the constructed case: the last token's query finds it, the chunk's mean does not
        assert needle_first == (n_tokens == 1)


def test_exact_query_tokens_stop_at_the_prompt_end_inside_the_chunk():
    q, k, v, inv, scale = _question_case(seed=12)
    mem = _store(RetrievalPolicy(topk=3, next_blocks=0, exact="query", exact_query_tokens=3))
    mem.prompt_end = 590  # the last chunk (550..600) holds it; its queries past 590 are not the question's
    _run(mem, q, k, v, [50], inv, scale)
    assert _sticky_picks(mem) == _reference_picks(mem, q[587:590], 3)


@pytest.mark.parametrize("reduce", ["sum", "max", "z"])
def test_exact_reduce_combines_a_kv_heads_query_heads_as_specified(reduce):
    q, k, v, inv, scale = _question_case(seed=13)
    mem = _store(RetrievalPolicy(topk=3, next_blocks=0, exact="query", exact_reduce=reduce))
    mem.prompt_end = 600
    _run(mem, q, k, v, [50], inv, scale)
    assert _sticky_picks(mem) == _reference_picks(mem, q[550:600], 3, reduce)


def test_select_blocks_reduce_follows_its_definition_and_the_reductions_differ():
    s = torch.randn(HQ, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    s[0, 7] = 9.0  # KV head 0: one query head points hard at block 7 (max picks it first)
    s[1:3, 9] = 3.0  # two query heads mildly at block 9 (sum picks it first)
    s[3:6] *= torch.tensor([[1.0], [50.0], [0.1]], dtype=torch.float64)  # KV head 1: heads of unlike scales
    grp = s.view(HKV, G, -1)
    refs = {"sum": grp.sum(1), "max": grp.amax(1),
            "z": ((grp - grp.mean(-1, keepdim=True)) / grp.std(-1, keepdim=True)).sum(1)}
    picks = {}
    for r, agg in refs.items():
        mask = select_blocks(s, 3, "kv_head", HKV, reduce=r)[2].view(HKV, G, -1)
        assert (mask == mask[:, :1]).all()  # a KV head's query heads share its picks
        picks[r] = [set(mask[h, 0].nonzero()[:, 0].tolist()) for h in range(HKV)]
        assert picks[r] == [set(agg[h].topk(3).indices.tolist()) for h in range(HKV)]
    assert 9 in picks["sum"][0] and 7 in picks["max"][0]
    assert len({frozenset(p[1]) for p in picks.values()}) > 1  # the options select differently here


def test_exact_layer_topk_sets_the_question_selection_per_layer_and_leaves_the_body():
    q, k, v, inv, scale = _question_case(seed=14)
    pol = RetrievalPolicy(topk=1, next_blocks=0, exact="query", exact_topk=4, exact_layer_topk=[[1, 7], [2, 0]])
    counts = {}
    for layer in (0, 1, 2):
        mem = _store(pol, layer)
        mem.prompt_end = 600
        body = _run(mem, q[:550], k[:550], v[:550], [50], inv, scale)
        assert int(mem.sticky.sum(1).max()) == 1  # body chunks: topk
        mem.attend(q[550:], k[550:], v[550:], 550, inv, scale)
        counts[layer] = mem.sticky.sum(1).tolist()
    assert counts == {0: [4] * HQ, 1: [7] * HQ, 2: [0] * HQ}
    ref = _store(RetrievalPolicy(topk=1, next_blocks=0), 1)
    for a, b in zip(body, _run(ref, q[:550], k[:550], v[:550], [50], inv, scale)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reduce", ["max", "z"])
def test_every_block_selected_with_the_options_is_still_dense(reduce):
    n_init, n_local, bs = 8, 64, 16
    pol = RetrievalPolicy(topk=10_000, exact="query", exact_every=1, reselect_every=3, exact_query_tokens=1,
                          exact_reduce=reduce, exact_layer_topk=((0, 10_000),))
    cfg = KVMemoryConfig(n_init=n_init, n_local=n_local, block_size=bs, compression="none", policy=pol)
    q, k, v = _qkv(420, seed=1, dtype=torch.float64)
    inv, scale = default_inv_freq(D, 10000.0), D**-0.5
    mem = KVLayerStore(cfg, 0, HKV, D)
    mem.prompt_end = 350
    out = torch.cat(_run(mem, q, k, v, [37, 100, 5, 64], inv, scale))
    torch.testing.assert_close(out, reference_attention(q, k, v, inv, scale, n_init, n_local), rtol=1e-9, atol=1e-9)


def test_policy_options_validate_and_survive_a_session_snapshot_config():
    from memserve.runtime.sessions import _cfg_from_json, _cfg_to_json

    with pytest.raises(AssertionError, match="exact_reduce"):
        RetrievalPolicy(exact_reduce="mean")
    with pytest.raises(AssertionError, match="exact_query_tokens"):
        RetrievalPolicy(exact_query_tokens=-1)
    cfg = KVMemoryConfig(policy=RetrievalPolicy(exact="query", exact_query_tokens=1, exact_reduce="z",
                                                exact_layer_topk=[[3, 5]]))
    assert cfg.policy.exact_layer_topk == ((3, 5),)
    assert _cfg_from_json(_cfg_to_json(cfg)) == cfg
