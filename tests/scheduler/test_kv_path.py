"""The scheduler's KV-path policy (scheduler/kv_path.py): memory vs dense per request, and the prefill
sub-chunks of a memory sequence."""

import pytest
from memserve.scheduler.kv_path import prefill_chunks, wants_kv_memory


def test_memory_vs_dense_choice():
    # "auto": only what does not fit the dense capacity (prompt + max_tokens > max_model_len)
    assert not wants_kv_memory("auto", 100, 28, 128)
    assert wants_kv_memory("auto", 100, 29, 128)
    assert wants_kv_memory("retrieval", 1, 1, 128) and not wants_kv_memory("off", 10_000, 1, 128)
    # the request's override wins over the mode; a session request always uses the memory
    assert not wants_kv_memory("retrieval", 1, 1, 128, override="off")
    assert wants_kv_memory("auto", 1, 1, 128, override="retrieval")
    assert wants_kv_memory("auto", 1, 1, 128, on_session=True)
    with pytest.raises(ValueError, match="session always uses"):
        wants_kv_memory("auto", 1, 1, 128, override="off", on_session=True)
    with pytest.raises(ValueError, match="mode"):
        wants_kv_memory("sometimes", 1, 1, 128)


def test_prefill_chunks_cover_the_step_and_bound_engaged_chunks():
    # inside the dense region (sinks + window) the step runs in one piece
    assert prefill_chunks(0, 500, 256, 640) == [(0, 500)]
    # reaching past it: chunk_size pieces, the last one shorter, covering every token once
    assert prefill_chunks(100, 600, 256, 640) == [(0, 256), (256, 256), (512, 88)]
    assert prefill_chunks(5000, 1, 256, 640) == [(0, 1)]
    assert prefill_chunks(0, 0, 256, 640) == []
    for p0, n in ((0, 1000), (700, 513), (639, 2)):
        pieces = prefill_chunks(p0, n, 64, 640)
        assert sum(m for _, m in pieces) == n and all(o == sum(m for _, m in pieces[:i]) for i, (o, _) in enumerate(pieces))
