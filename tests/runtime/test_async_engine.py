"""AsyncLLMEngine: streaming, concurrency, cancellation frees blocks, bounded queue."""

import asyncio

import pytest
from memserve.runtime import SamplingParams
from memserve.runtime.engine import LLMEngine
from memserve.runtime.errors import InvalidRequestError, QueueFullError

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture
def engine(tiny_async_engine):
    return tiny_async_engine


async def collect(eng, prompt, params, rid):
    return [o async for o in eng.generate(prompt, params, rid)]


def test_streams_concurrent_requests_like_the_sync_engine(engine, request):
    async def main():
        outs = await asyncio.gather(*(collect(engine, list(range(10, 10 + n)), SamplingParams(max_tokens=6, **GREEDY),
                                              f"r{n}") for n in (3, 9, 14)))
        return outs
    outs = asyncio.run(main())
    for stream in outs:
        assert len(stream) == 6 and stream[-1].finish_reason == "length"
        assert [t for o in stream for t in o.new_token_ids] == stream[-1].token_ids
    # same greedy tokens as a synchronous engine alone
    ref = LLMEngine(request.getfixturevalue("tiny_llama_ckpt"), progress=False, num_kv_blocks=64)
    ref.add_request("x", list(range(10, 19)), SamplingParams(max_tokens=6, **GREEDY))
    final = None
    while ref.has_unfinished():
        for o in ref.step():
            final = o
    assert final.token_ids == outs[1][-1].token_ids


def test_cancelling_the_iterator_aborts_and_frees_blocks(engine):
    async def main():
        free0 = engine.stats().num_free_blocks
        agen = engine.generate(list(range(10, 40)), SamplingParams(max_tokens=1000, **GREEDY), "long")
        got = 0
        async for _ in agen:
            got += 1
            if got == 3:
                break
        await agen.aclose()
        for _ in range(200):
            if engine.stats().num_running == 0 and engine.stats().num_free_blocks == free0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().num_free_blocks == free0 and engine.stats().num_running == 0

        # task cancellation while waiting for the next token
        task = asyncio.create_task(collect(engine, list(range(10, 30)), SamplingParams(max_tokens=1000, **GREEDY), "t"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if engine.stats().num_running == 0 and engine.stats().num_free_blocks == free0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().num_free_blocks == free0

        # explicit abort: the stream ends with finish_reason "abort"
        async def abort_soon():
            await asyncio.sleep(0.1)
            await engine.abort("ab")
        asyncio.create_task(abort_soon())
        outs = await collect(engine, list(range(10, 30)), SamplingParams(max_tokens=100000, **GREEDY), "ab")
        assert outs[-1].finish_reason == "abort"
    asyncio.run(main())


def test_bad_input_raises_in_the_caller_and_queue_is_bounded(engine):
    # a SamplingParams mutated after construction is re-validated by the engine
    sp = SamplingParams(max_tokens=2)
    sp.temperature = -1.0

    async def bad():
        return await collect(engine, [1, 2], sp, "bad")
    with pytest.raises(InvalidRequestError, match="temperature"):
        asyncio.run(bad())

    async def flood():
        # one running sequence with a long generation; the others wait behind it (bound: 4)
        gens = [engine.generate([1, 2, 3], SamplingParams(max_tokens=500, **GREEDY), f"q{i}") for i in range(7)]

        async def first(g):
            try:
                return await g.__anext__()
            except QueueFullError:
                return "full"
        tasks = [asyncio.create_task(first(g)) for g in gens]
        await asyncio.sleep(1.0)
        errors = sum(1 for t in tasks if t.done() and t.result() == "full")
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for g in gens:
            await g.aclose()
        return errors

    engine.engine.scheduler.config.max_num_seqs = 1
    errors = asyncio.run(asyncio.wait_for(flood(), 60))
    assert errors >= 1
    info = engine.model_info()
    assert info["num_layers"] == 3
    st = engine.stats()
    assert 0.0 <= st.kv_cache_usage_perc <= 1.0


@pytest.mark.parametrize("gap_s, spacing_s, first_step", [(0.3, 0.05, 3), (0.0, 0.3, 1)])
def test_an_idle_engine_admits_requests_that_follow_closely_into_its_first_step(tiny_llama_ckpt, gap_s, spacing_s,
                                                                                first_step):
    """The admission window (runtime/async_engine.py): requests arriving within admit_gap_s of each
    other at an idle engine prefill in one first step; with the window off the first request's step
    runs alone. Spacings far from the gap so a loaded machine cannot flip the outcome."""
    from memserve.runtime.async_engine import AsyncLLMEngine

    eng = AsyncLLMEngine(tiny_llama_ckpt, progress=False, num_kv_blocks=128, block_size=4, max_num_seqs=4,
                         admit_gap_s=gap_s, admit_max_s=2.0)
    sizes = []
    step = eng.engine.step

    def counted():
        out = step()
        sizes.append(len(out))
        return out

    eng.engine.step = counted

    async def later(i):
        await asyncio.sleep(i * spacing_s)
        return await collect(eng, list(range(10, 15 + i)), SamplingParams(max_tokens=3, **GREEDY), f"a{i}")

    async def main():
        return await asyncio.gather(*(later(i) for i in range(3)))

    try:
        outs = asyncio.run(main())
    finally:
        eng.shutdown()
    assert [len(o) for o in outs] == [3, 3, 3]
    assert sizes[0] == first_step
