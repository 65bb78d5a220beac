"""RetrievalPolicy.positions "ordered" (runtime/kv_memory/positions.py): the selected blocks in their original
order at consecutive positions before the window, which keeps its true positions; the sinks at position 0.
Checked against float64 references: every block selected == dense RoPE attention with the sinks at
position 0 (`reference_attention_ordered`), and a few blocks selected == the ordered layout of exactly those
blocks, computed here from the memory's picks."""

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
from memserve.runtime.kv_memory.positions import ordered_slot_positions, reference_attention_ordered
from memserve.scheduler.kv_policy import RetrievalPolicy

G = HQ // HKV


def _run(mem, q, k, v, chunks, inv, scale, p=0):
    return torch.cat(attend_in_chunks(mem, q, k, v, chunks, inv, scale, p))


def _cfg(**pol):
    return KVMemoryConfig(n_init=8, n_local=64, block_size=16, compression="none", cache_blocks=4,
                          policy=RetrievalPolicy(positions="ordered", **pol))


def test_slot_positions_sorted_and_right_aligned():
    ids = torch.tensor([[7, 2, 5, -1], [3, 9, 1, 4]])
    pos = ordered_slot_positions(ids, ids >= 0, n_s=8, bs=2).view(2, 4, 2)[..., 0]
    # head 0: 3 picks sorted 2 < 5 < 7 at slots 1, 2, 3 (one padding slot: right-aligned)
    assert pos[0, :3].tolist() == [8 + 3 * 2, 8 + 1 * 2, 8 + 2 * 2]
    assert pos[1].tolist() == [8 + 1 * 2, 8 + 3 * 2, 8 + 0 * 2, 8 + 2 * 2]


@pytest.mark.parametrize("granularity", ["shared", "kv_head"])
@pytest.mark.parametrize("chunks", [[1], [37, 100, 5, 64], [300]])
@pytest.mark.parametrize("reselect_every", [1, 5])
def test_all_blocks_equals_dense_reference(granularity, chunks, reselect_every):
    t = 520
    cfg = _cfg(topk=10_000, granularity=granularity, reselect_every=reselect_every)
    q, k, v = _qkv(t)
    inv, scale = default_inv_freq(D, 10000.0), D**-0.5
    mem = KVLayerStore(cfg, 0, HKV, D)
    out = _run(mem, q, k, v, chunks, inv, scale)
    ref = reference_attention_ordered(q, k, v, inv, scale, 8, 64)
    assert mem.num_blocks > 20
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    # and it is not the InfLLM scheme (the references differ on this input)
    assert (ref - reference_attention(q, k, v, inv, scale, 8, 64)).abs().max() > 1e-3


def test_token_path_equals_chunk_path():
    q, k, v = _qkv(400, seed=4)
    inv, scale = default_inv_freq(D, 10000.0), D**-0.5
    outs = []
    for token_path in (True, False):
        mem = KVLayerStore(_cfg(topk=3, next_blocks=1), 0, HKV, D)
        mem.token_path = token_path
        outs.append(_run(mem, q, k, v, [250, 1], inv, scale))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-9)


def _ordered_reference_last(mem, q, k, v, inv, scale):
    """float64: the last query's output under "ordered" with the memory's own picks (mem.sel_rows), laid out
    independently here: per KV head its picked blocks sorted, right-aligned to the widest head's count K."""
    t, bs, n_s = q.shape[0], mem.cfg.block_size, mem.n_sinks
    p = t - 1
    sel = mem._selected_rows()  # (Hkv, NB)
    starts = mem.block_pos.get()
    buf_start = p + 1 - (mem.wkeys.n - n_s)
    kk = int(sel.sum(1).max())
    g_pos = n_s + kk * bs + (p - buf_start)
    out = torch.zeros(HQ, D, dtype=torch.float64)
    for h in range(HKV):
        blocks = sorted(int(b) for b in sel[h].nonzero().flatten())
        cols, pos_k = [], []
        for s, b in enumerate(blocks):
            j0 = int(starts[b])
            cols += list(range(j0, j0 + bs))
            pos_k += [n_s + (kk - len(blocks) + s) * bs + j for j in range(bs)]
        cols_buf = list(range(buf_start, p + 1))
        pos_k += [g_pos - (p - j) for j in cols_buf]
        cols += cols_buf
        kr = rotate(k[cols, h : h + 1].double(), torch.tensor(pos_k), inv.double())[:, 0]
        keys = torch.cat((k[:n_s, h].double(), kr))  # sinks unrotated
        vals = torch.cat((v[:n_s, h], v[cols, h])).double()
        for i in range(h * G, (h + 1) * G):
            qi = rotate(q[p : p + 1, i : i + 1].double(), torch.tensor([g_pos]), inv.double())[0, 0]
            out[i] = torch.softmax(keys @ qi * scale, 0) @ vals
    return out


@pytest.mark.parametrize("chunks", [[1], [200, 1]])
def test_few_blocks_equal_the_ordered_layout_of_the_picks(chunks):
    """topk 3 + the block after the best pick, sticky off: heads pick different blocks (padding), the last
    decode step's output equals the ordered layout of exactly its picks (and differs from InfLLM's)."""
    q, k, v = _qkv(450, seed=7)
    inv, scale = default_inv_freq(D, 10000.0), D**-0.5
    mem = KVLayerStore(_cfg(topk=3, sticky=False, next_blocks=1, reselect_every=1), 0, HKV, D)
    out = _run(mem, q, k, v, chunks, inv, scale)
    ref = _ordered_reference_last(mem, q, k, v, inv, scale)
    torch.testing.assert_close(out[-1], ref, rtol=1e-9, atol=1e-9)
    infllm = KVLayerStore(_cfg(topk=3, sticky=False, next_blocks=1, reselect_every=1), 0, HKV, D)
    infllm.cfg.policy.positions = "infllm"
    assert (_run(infllm, q, k, v, chunks, inv, scale)[-1] - out[-1]).abs().max() > 1e-3


def test_ordered_question_leaves_the_body_unchanged():
    """"ordered_question": chunks before the one holding the prompt's end attend exactly as under "infllm";
    from that chunk on the outputs follow the ordered scheme."""
    q, k, v = _qkv(420, seed=9)
    inv, scale = default_inv_freq(D, 10000.0), D**-0.5
    outs = {}
    for pos in ("infllm", "ordered_question", "ordered"):
        mem = KVLayerStore(_cfg(topk=3), 0, HKV, D)
        mem.cfg.policy.positions = pos
        mem.prompt_end = 400
        outs[pos] = _run(mem, q, k, v, [100, 100, 100, 100, 1], inv, scale)
    torch.testing.assert_close(outs["ordered_question"][:300], outs["infllm"][:300], rtol=0, atol=0)
    assert (outs["ordered_question"][:300] - outs["ordered"][:300]).abs().max() > 1e-3
    assert (outs["ordered_question"][300:] - outs["infllm"][300:]).abs().max() > 1e-3
