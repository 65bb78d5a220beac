"""KV memory inside the engine (tiny random-weight Llama): routing, chunked prefill in bounded memory,
sessions, snapshots."""

import pytest
import torch
from memserve.runtime.engine import LLMEngine
from memserve.runtime.errors import InvalidRequestError, SessionNotFoundError
from memserve.runtime.sampling import SamplingParams
from memserve.runtime.sessions import torch_equal_sessions

# tiny windows so that a few hundred tokens engage the memory
SMALL = {"n_init": 4, "n_local": 32, "block_size": 8, "repr_topk": 2, "chunk_size": 24, "key_group": 8,
         "value_group": 8}
ALL_BLOCKS = {**SMALL, "topk": 10_000, "compression": "none"}


def _engine(path, mode="retrieval", cfg=None, **kw):
    return LLMEngine(str(path), progress=False, kv_memory=mode, kv_memory_config=cfg, **kw)


def _run(eng, prompt, max_tokens=6, session_id=None, rid="r", output=False, **pkw):
    eng.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **pkw),
                    session_id=session_id)
    out = None
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == rid:
                out = o
    return out if output else out.token_ids


def _prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 1000, (n,), generator=g).tolist()


def test_short_prompt_identical_with_memory_on_and_off(tiny_llama_dir):
    p = _prompt(20)  # 20 + 6 tokens < n_init + n_local = 36: dense by construction
    off = _run(_engine(tiny_llama_dir, "off"), p)
    on_eng = _engine(tiny_llama_dir, "retrieval", SMALL)
    on = _run(on_eng, p)
    assert on == off
    auto = _run(_engine(tiny_llama_dir, "auto", SMALL), p)  # fits the dense path: not routed to memory
    assert auto == off


def test_long_prompt_engages_memory_and_is_chunking_invariant(tiny_llama_dir):
    """All blocks + no compression: only the chunking differs between the two runs (same scheme)."""
    p = _prompt(300, seed=1)
    a = _engine(tiny_llama_dir, "retrieval", ALL_BLOCKS, max_num_batched_tokens=64)
    b = _engine(tiny_llama_dir, "retrieval", {**ALL_BLOCKS, "chunk_size": 1000}, max_num_batched_tokens=1000)
    ta = _run(a, p, max_tokens=8)
    tb = _run(b, p, max_tokens=8)
    assert ta == tb
    st = a.stats()
    assert st.num_free_blocks == st.num_total_blocks - 1  # memory sequences take no paged blocks (scratch)


def test_memory_and_dense_agree_on_the_first_token_within_window(tiny_llama_dir):
    """Logit-level: dense engine vs memory engine on a prompt just inside n_init + n_local."""
    p = _prompt(35, seed=2)
    off = _engine(tiny_llama_dir, "off")
    on = _engine(tiny_llama_dir, "retrieval", SMALL)
    assert _run(off, p, max_tokens=1) == _run(on, p, max_tokens=1)


def test_prefill_8x_window_stays_within_budget(tiny_llama_dir):
    window = SMALL["n_init"] + SMALL["n_local"]
    budget = 20_000
    eng = _engine(tiny_llama_dir, "retrieval", {**SMALL, "compression": "int8", "budget_bytes": budget,
                                               "topk": 2})
    n = 8 * window + 50
    eng.add_request("r", _prompt(n, seed=3), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    peak_mem = peak_dev = 0
    while eng.has_unfinished():
        eng.step()
        st = eng.stats().kv_memory_bytes
        peak_mem, peak_dev = max(peak_mem, st.get("memory", 0)), max(peak_dev, st.get("memory_device", 0))
    assert 0 < peak_mem <= budget
    c = eng.config
    per_tok = 2 * c.num_key_value_heads * c.head_dim * 4 * c.num_hidden_layers  # fp32 K+V, all layers
    # device tier: sinks + window + one block + the sub-chunk, + LRU cache (64 blocks max) + reprs
    bound = per_tok * (window + SMALL["block_size"] + SMALL["chunk_size"] + 64 * SMALL["block_size"]) * 1.2
    assert peak_dev <= bound


def test_request_topk_override_and_off_override(tiny_llama_dir):
    eng = _engine(tiny_llama_dir, "auto", SMALL, max_model_len=64)
    long = _prompt(200, seed=4)
    with pytest.raises(InvalidRequestError):
        eng.add_request("x", long, SamplingParams(max_tokens=2, kv_memory="off"))
    eng.add_request("a", long, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    eng.step()
    assert eng.memory.uses_memory("a")  # auto: too long for the dense path -> memory
    assert eng.memory.backend.memories["a"].layers[0].cfg.policy.topk == SMALL.get("topk", 8)
    while eng.has_unfinished():
        eng.step()
    eng.add_request("b", long, SamplingParams(max_tokens=3, temperature=0.0, memory_topk=10_000))
    eng.step()
    assert eng.memory.backend.memories["b"].layers[0].cfg.policy.topk == 10_000
    while eng.has_unfinished():
        eng.step()
    assert not eng.memory.backend.memories  # memory dropped when the requests ended
    with pytest.raises(InvalidRequestError):
        SamplingParams(kv_memory="sometimes")


def test_session_continuation_equals_one_shot(tiny_llama_dir):
    doc, question = _prompt(200, seed=5), _prompt(12, seed=6)
    one = _engine(tiny_llama_dir, "retrieval", ALL_BLOCKS)
    ref = _run(one, doc + question, max_tokens=6)
    eng = _engine(tiny_llama_dir, "retrieval", ALL_BLOCKS, max_num_batched_tokens=64)
    progress = list(eng.ingest("s1", doc))
    assert progress[-1]["done"] and progress[-1]["session"]["num_computed_tokens"] == len(doc)
    assert any(not p["done"] for p in progress)  # ingest reports progress on the way
    got = _run(eng, question, max_tokens=6, session_id="s1", output=True)
    assert got.token_ids == ref
    assert got.num_cached_tokens == len(doc)  # the document's KV came from the session, not recomputed
    info = eng.get_session("s1")
    assert info["num_tokens"] == len(doc) + len(question) + 6
    assert info["bytes"]["memory"] > 0 and info["bytes"]["device"] > 0
    # a second turn continues from the stored memory (no recompute of the document)
    _run(eng, _prompt(5, seed=7), max_tokens=2, session_id="s1", rid="r2")
    assert eng.get_session("s1")["num_computed_tokens"] == len(doc) + len(question) + 6 + 5 + 1


def test_snapshot_roundtrip_bit_exact(tiny_llama_dir, tmp_path):
    eng = _engine(tiny_llama_dir, "retrieval", {**SMALL, "compression": "int4"})
    list(eng.ingest("s", _prompt(150, seed=8)))
    path = str(tmp_path / "s.safetensors")
    eng.save_session("s", path)
    eng.load_session(path, session_id="s_copy")
    a, b = eng.memory.sessions.get("s"), eng.memory.sessions.get("s_copy")
    assert torch_equal_sessions(a, b)
    q = _prompt(6, seed=9)
    assert _run(eng, q, session_id="s", rid="x") == _run(eng, q, session_id="s_copy", rid="y")
    names = {s["session_id"] for s in eng.list_sessions()}
    assert names == {"s", "s_copy"}
    eng.delete_session("s_copy")
    assert {s["session_id"] for s in eng.list_sessions()} == {"s"}
    assert eng.stats().sessions_active == 1


def test_snapshot_of_another_format_is_a_clear_error(tiny_llama_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    eng = _engine(tiny_llama_dir, "retrieval", SMALL)
    list(eng.ingest("s", _prompt(150, seed=8)))
    path = str(tmp_path / "s.safetensors")
    eng.save_session("s", path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    old = str(tmp_path / "old.safetensors")
    save_file(load_file(path), old, metadata={**meta, "format": "memserve.session.v1"})
    with pytest.raises(InvalidRequestError, match="memserve.session.v1 snapshot.*ingest the document again"):
        eng.load_session(old)
    other = str(tmp_path / "other.safetensors")
    save_file({"w": torch.zeros(2)}, other)
    with pytest.raises(InvalidRequestError, match="not a memserve session snapshot"):
        eng.load_session(other)


def test_snapshot_from_before_per_layer_kinds_loads_and_continues(tiny_llama_dir, tmp_path):
    """A v2 snapshot written before per-layer compression existed (its config has no such keys; every
    layer one kind) loads as such -- the int4 preset's int8-key layers are not applied to its int4 blocks
    -- and answers exactly like the session it was taken from."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    eng = _engine(tiny_llama_dir, "retrieval", {**SMALL, "compression": "int4", "int4_int8_key_layers": []})
    list(eng.ingest("s", _prompt(150, seed=8)))
    path, old = str(tmp_path / "s.safetensors"), str(tmp_path / "old.safetensors")
    eng.save_session("s", path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    cfg = json.loads(meta["config"])
    for key in ("int4_int8_key_layers", "layer_compression", "exact_keys", "exact_values"):
        del cfg[key]
    save_file(load_file(path), old, metadata={**meta, "config": json.dumps(cfg)})
    eng.load_session(old, session_id="s_old")
    loaded = eng.memory.sessions.get("s_old").memory.cfg
    assert loaded.int4_int8_key_layers == () and loaded.layer_compression == () and loaded.exact_values == 0
    q = _prompt(6, seed=9)
    assert _run(eng, q, session_id="s", rid="x") == _run(eng, q, session_id="s_old", rid="y")


def test_unknown_session_is_a_clear_error(tiny_llama_dir):
    eng = _engine(tiny_llama_dir, "auto", SMALL)
    with pytest.raises(SessionNotFoundError, match="unknown session 'nope'"):
        eng.get_session("nope")
    with pytest.raises(SessionNotFoundError):
        eng.delete_session("nope")
    off = _engine(tiny_llama_dir, "off")
    with pytest.raises(InvalidRequestError):
        off.list_sessions()


def test_async_ingest_progress_and_session_generate(tiny_llama_dir):
    import asyncio

    from memserve.runtime.async_engine import AsyncLLMEngine

    eng = _engine(tiny_llama_dir, "retrieval", ALL_BLOCKS, max_num_batched_tokens=32)
    aeng = AsyncLLMEngine(engine=eng)
    doc, q = _prompt(300, seed=10), _prompt(8, seed=11)

    async def go():
        progress = [p async for p in aeng.ingest("a", doc, poll_s=0.01)]
        outs = [o async for o in aeng.generate(q, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                                               session_id="a")]
        listed = [s["session_id"] for s in await aeng.list_sessions()]
        await aeng.delete_session("a")
        with pytest.raises(SessionNotFoundError):
            await aeng.get_session("a")
        return progress, outs[-1], listed

    try:
        progress, last, listed = asyncio.run(go())
    finally:
        aeng.shutdown()
    assert progress[-1]["done"] and progress[-1]["session"]["num_computed_tokens"] == len(doc)
    assert all(0 <= p["tokens_done"] <= p["tokens_total"] == len(doc) for p in progress[:-1])
    ref = _run(_engine(tiny_llama_dir, "retrieval", ALL_BLOCKS), doc + q, max_tokens=4)
    assert last.token_ids == ref
    assert listed == ["a"]


def test_concurrent_memory_decodes_share_one_kernel_call_per_layer(tiny_llama_dir, monkeypatch):
    """Three long sequences decoding together: each layer's decode attention is ONE
    `kv_memory_decode_attention` call over all of them (issue 15 item 4), and each sequence's tokens equal
    its run alone (the batched op changes nothing per sequence)."""
    import memserve.runtime.kv_memory.attention as kva

    prompts = [_prompt(150 + 20 * i, seed=10 + i) for i in range(3)]
    alone = [_run(_engine(tiny_llama_dir, "retrieval", SMALL), p, max_tokens=5) for p in prompts]
    batch_sizes = []
    real = kva.kv_memory_decode_attention

    def counting(q_far, *a, **kw):
        batch_sizes.append(q_far.shape[0])
        return real(q_far, *a, **kw)

    monkeypatch.setattr(kva, "kv_memory_decode_attention", counting)
    eng = _engine(tiny_llama_dir, "retrieval", SMALL)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    got: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                got[o.request_id] = o.token_ids
    assert [got[f"r{i}"] for i in range(3)] == alone
    assert 3 in batch_sizes, f"no step decoded the 3 memory sequences in one call: {batch_sizes}"
    # a 3-sequence decode step makes exactly one call per layer
    assert batch_sizes.count(3) % eng.model.config.num_hidden_layers == 0
