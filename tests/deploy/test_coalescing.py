"""Stream coalescing (issue 18 item 4), Ray-free: the real AsyncLLMEngine on a tiny model, read with
`coalesce=True` by a consumer that falls behind, must give the same tokens, text, finish reason and
stop reason as the same request read one output per token -- across multi-byte UTF-8 characters
split over byte tokens, stop strings (held-back text), stop tokens and aborts -- and the serving
worker's messages must carry exactly that. The model's tokens are scripted (the engine's sampler is
replaced) so that the stream contains split characters and stop strings; everything else (forward,
detokenizer, stop handling, the async engine, the worker) is the real code."""

from __future__ import annotations

import asyncio

import pytest
from memserve.deploy.worker import EngineWorker
from memserve.runtime import SamplingParams
from memserve.runtime import engine as engine_mod
from memserve.runtime.outputs import RequestOutput, merge_outputs
from memserve.runtime.tokenizer import byte_level_alphabet

SLOW_S = 0.03  # the consumer's pause per item: many engine steps of the tiny model


@pytest.fixture
def engine(tiny_async_engine):
    return tiny_async_engine


def byte_tokens(tok, data: bytes) -> list[int]:
    """One single-byte token per byte (byte-level BPE), so a multi-byte character spans several tokens."""
    alpha = byte_level_alphabet()
    ids = [tok._id(alpha[b]) for b in data]
    assert None not in ids, data
    return ids


def script_for(tok) -> tuple[list[int], str]:
    """Tokens whose text has 2-, 3- and 4-byte characters split across tokens, and a stop string."""
    ids = tok.encode("Hi", add_special_tokens=False)
    ids += byte_tokens(tok, "é".encode())  # 2 bytes
    ids += tok.encode(" ok", add_special_tokens=False)
    ids += byte_tokens(tok, "€".encode())  # 3 bytes
    ids += byte_tokens(tok, " 😀".encode())  # space + 4 bytes
    ids += tok.encode(" END more words", add_special_tokens=False)
    ids += byte_tokens(tok, "ü".encode())
    return ids, tok.decode(ids)


@pytest.fixture
def scripted(monkeypatch):
    """Replace the engine's sampler: request i of the test gets script tokens in order."""
    state = {"script": [], "pos": {}}

    def sample(logits, params, generators):
        out = []
        for p in params:  # one row per request; rows are told apart by their params object (kept
            entry = state["pos"].setdefault(id(p), [p, 0])  # alive here, so its id is not reused)
            out.append(state["script"][entry[1] % len(state["script"])])
            entry[1] += 1
        return out

    monkeypatch.setattr(engine_mod, "sample", sample)
    return state


async def read(agen, slow: float = 0.0) -> list:
    items = []
    async for o in agen:
        items.append(o)
        if slow:
            await asyncio.sleep(slow)
    return items


def run_both(engine, prompt, params_kw) -> tuple[list, list]:
    async def main():
        plain = await read(engine.generate(prompt, SamplingParams(**params_kw), "plain"))
        merged = await read(engine.generate(prompt, SamplingParams(**params_kw), "merged", coalesce=True), SLOW_S)
        return plain, merged
    return asyncio.run(main())


def assert_same_stream(plain: list, merged: list) -> None:
    """The coalesced stream says exactly what the per-token stream says."""
    assert len(merged) < len(plain), "the slow consumer should have received merged items"
    for items in (plain, merged):
        last = items[-1]
        assert [t for o in items for t in o.new_token_ids] == last.token_ids
        assert "".join(o.new_text for o in items) == last.text
        assert all(o.finish_reason is None for o in items[:-1])
    a, b = plain[-1], merged[-1]
    assert (b.token_ids, b.text, b.finish_reason, b.stop_reason) == (a.token_ids, a.text, a.finish_reason, a.stop_reason)


def test_merge_outputs_joins_deltas_and_keeps_the_newest_cumulative_fields():
    def out(ids, text, new_ids, new_text, fin=None):
        return RequestOutput("r", [1], ids, text, new_ids, new_text, fin)

    parts = [out([5], "", [5], ""), out([5, 6], "é", [6], "é"), out([5, 6, 7], "éx", [7], "x", "length")]
    m = merge_outputs(parts)
    assert (m.new_token_ids, m.new_text, m.token_ids, m.text, m.finish_reason) == ([5, 6, 7], "éx", [5, 6, 7], "éx", "length")
    assert merge_outputs(parts[:1]) is parts[0]
    assert parts[0].new_token_ids == [5]  # inputs untouched


def test_split_utf8_characters_coalesce_to_the_same_text(engine, scripted):
    tok = engine.tokenizer
    scripted["script"], text = script_for(tok)
    n = len(scripted["script"])
    plain, merged = run_both(engine, "Once", dict(max_tokens=n, temperature=0, ignore_eos=True))
    assert any(o.new_token_ids and not o.new_text for o in plain), "no token ended inside a character"
    assert_same_stream(plain, merged)
    assert merged[-1].text == text and merged[-1].finish_reason == "length"
    assert "😀" in merged[-1].text and "\ufffd" not in "".join(o.new_text for o in merged)


def test_stop_string_and_held_back_text_coalesce_identically(engine, scripted):
    tok = engine.tokenizer
    scripted["script"], text = script_for(tok)
    n = len(scripted["script"])
    plain, merged = run_both(engine, "Once", dict(max_tokens=n, temperature=0, ignore_eos=True, stop=["END m"]))
    assert_same_stream(plain, merged)
    assert merged[-1].finish_reason == "stop" and merged[-1].stop_reason == "END m"
    assert merged[-1].text == text[:text.index("END m")]


def test_stop_token_coalesces_identically(engine, scripted):
    tok = engine.tokenizer
    scripted["script"], _ = script_for(tok)
    stop_id = scripted["script"][9]
    plain, merged = run_both(engine, "Once", dict(max_tokens=40, temperature=0, stop_token_ids=[stop_id]))
    assert_same_stream(plain, merged)
    assert merged[-1].finish_reason == "stop" and merged[-1].stop_reason == stop_id


def test_abort_ends_a_coalesced_stream_with_everything_before_it(engine, scripted):
    scripted["script"], _ = script_for(engine.tokenizer)

    free0 = engine.stats().num_free_blocks

    async def main():
        agen = engine.generate("Once", SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True), "ab",
                               coalesce=True)
        items = [await agen.__anext__()]
        await asyncio.sleep(SLOW_S)
        await engine.abort("ab")
        items += await read(agen, SLOW_S)
        return items

    items = asyncio.run(main())
    last = items[-1]
    assert last.finish_reason == "abort" and len(last.token_ids) > len(items)
    assert [t for o in items for t in o.new_token_ids] == last.token_ids
    assert "".join(o.new_text for o in items) == last.text
    st = engine.stats()
    assert (st.num_running, st.num_free_blocks) == (0, free0)


def test_worker_messages_carry_the_per_token_stream(engine, scripted):
    """EngineWorker (the replica side of the wire) with a consumer that lags: fewer messages, same
    tokens / text / finish reason / usage as the engine's per-token stream."""
    tok = engine.tokenizer
    scripted["script"], text = script_for(tok)
    n = len(scripted["script"])
    worker = EngineWorker(engine, model_name="tiny", replica="r0")
    req = {"request_id": "w1", "prompt": "Once", "sampling": dict(max_tokens=n, temperature=0, ignore_eos=True, stop=["END m"])}

    async def main():
        plain = await read(engine.generate("Once", SamplingParams(**req["sampling"]), "w0"))
        msgs = await read(worker.generate(req), SLOW_S)
        return plain, msgs

    plain, msgs = asyncio.run(main())
    assert msgs[0] == {"accepted": "r0"}
    body = msgs[1:]
    assert len(body) < len(plain)
    assert [t for m in body for t in m["token_ids"]] == plain[-1].token_ids
    assert "".join(m["text"] for m in body) == plain[-1].text == text[:text.index("END m")]
    assert [m["finish_reason"] for m in body] == [None] * (len(body) - 1) + ["stop"]
    assert body[-1]["usage"]["completion_tokens"] == len(plain[-1].token_ids)
