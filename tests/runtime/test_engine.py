"""LLMEngine / LLM end to end on tiny random-weight models: batching invariance, stops, streaming, errors."""

import memserve.runtime.engine as engine_mod
import pytest
import torch
from memserve.runtime import LLM, SamplingParams
from memserve.runtime.engine import EngineArgs, LLMEngine
from memserve.runtime.errors import InvalidRequestError, ModelNotFoundError
from memserve.runtime.loader import load_checkpoint

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tiny_llama_dir):
    return load_checkpoint(str(tiny_llama_dir), progress=False)


def make_llm(ckpt, **kw):
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("progress", False)
    return LLM(ckpt, **kw)


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lengths]


def test_batch_with_chunked_prefill_and_preemption_equals_alone(ckpt):
    prompts = prompts_of([3, 50, 17, 90, 8, 33, 120, 61])
    params = SamplingParams(max_tokens=20, **GREEDY)
    alone_llm = make_llm(ckpt)
    alone = [alone_llm.generate([p], params, use_tqdm=False)[0].token_ids for p in prompts]
    # 8-token chunks of a 24-token budget, and a pool far too small for all 8 sequences at once
    llm = make_llm(ckpt, block_size=8, num_kv_blocks=30, max_num_batched_tokens=24, max_num_seqs=8)
    free0 = llm.engine.stats().num_free_blocks
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == alone
    st = llm.engine.stats()
    assert st.num_preemptions_total > 0, "the test must force preemption"
    assert st.num_free_blocks == free0 and st.num_running == 0 and st.num_waiting == 0


def test_stop_string_trims_text_and_streams_consistently(ckpt):
    llm = make_llm(ckpt)
    full = llm.generate("The capital of France is", SamplingParams(max_tokens=40, **GREEDY), use_tqdm=False)[0]
    text = full.text
    assert len(text) > 20
    stop = text[12:15]
    cut = text.find(stop)
    params = SamplingParams(max_tokens=40, stop=[stop, "\x00never"], **GREEDY)
    out = llm.generate("The capital of France is", params, use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:cut]
    pieces = list(llm.stream("The capital of France is", params))
    assert "".join(p.new_text for p in pieces) == text[:cut]
    assert pieces[-1].finish_reason == "stop" and all(p.finish_reason is None for p in pieces[:-1])
    assert sum(len(p.new_token_ids) for p in pieces) == len(pieces[-1].token_ids)


def test_streaming_never_emits_broken_utf8(ckpt, monkeypatch):
    llm = make_llm(ckpt)
    tok = llm.get_tokenizer()
    target = "Hi 🙂 世界 naïve 🎉!"
    script = tok.encode(target)
    assert any("\ufffd" in tok.decode([i]) for i in script), "the script must split characters"
    it = iter(script + [2])

    def scripted(logits, params, generators):
        return [next(it) for _ in params]

    monkeypatch.setattr(engine_mod, "sample", scripted)
    pieces = list(llm.stream([1, 2, 3], SamplingParams(max_tokens=50)))
    assert all("\ufffd" not in p.new_text for p in pieces)
    assert "".join(p.new_text for p in pieces) == target == pieces[-1].text
    assert pieces[-1].finish_reason == "stop" and pieces[-1].stop_reason == 2  # EOS


def test_eos_stop_token_ids_and_length(ckpt, monkeypatch):
    llm = make_llm(ckpt)
    seq = [500, 501, 2, 502, 503, 504]

    def scripted_factory():
        it = iter(seq * 3)
        return lambda logits, params, generators: [next(it) for _ in params]

    monkeypatch.setattr(engine_mod, "sample", scripted_factory())
    out = llm.generate([5, 6], SamplingParams(max_tokens=10), use_tqdm=False)[0]
    assert out.token_ids == [500, 501, 2] and out.finish_reason == "stop"
    monkeypatch.setattr(engine_mod, "sample", scripted_factory())
    out = llm.generate([5, 6], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert out.token_ids == [500, 501, 2, 502, 503] and out.finish_reason == "length"
    monkeypatch.setattr(engine_mod, "sample", scripted_factory())
    out = llm.generate([5, 6], SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=[503]),
                       use_tqdm=False)[0]
    assert out.token_ids == [500, 501, 2, 502, 503] and out.stop_reason == 503


def test_abort_and_finish_free_blocks(ckpt):
    eng = LLMEngine(ckpt, progress=False, block_size=4, num_kv_blocks=64)
    free0 = eng.stats().num_free_blocks
    eng.add_request("a", list(range(10, 40)), SamplingParams(max_tokens=100, **GREEDY))
    eng.add_request("b", list(range(10, 20)), SamplingParams(max_tokens=3, **GREEDY))
    eng.add_request("c", list(range(10, 15)), SamplingParams(max_tokens=3, **GREEDY))
    eng.abort_request("c")  # while waiting
    for _ in range(5):
        eng.step()
    assert eng.stats().num_free_blocks < free0 and eng.stats().num_running == 1
    out = eng.abort_request("a")  # while running
    assert out.finish_reason == "abort" and len(out.token_ids) == 5
    assert eng.stats().num_free_blocks == free0 and not eng.has_unfinished()
    assert eng.abort_request("nope") is None


@pytest.mark.parametrize("kw,field", [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"), (dict(top_k=-1), "top_k"),
])
def test_invalid_sampling_values_name_the_field(kw, field):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kw)
    assert e.value.field == field and field in str(e.value) and isinstance(e.value, ValueError)


def test_prompt_longer_than_the_context_is_rejected(ckpt):
    llm = make_llm(ckpt, max_model_len=64, kv_memory="off")
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([[7] * 100], SamplingParams(max_tokens=4))
    assert e.value.field == "prompt" and "100" in str(e.value) and "64" in str(e.value)
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([[]], SamplingParams(max_tokens=4))
    assert e.value.field == "prompt"
    with pytest.raises(InvalidRequestError):
        llm.generate([[10 ** 9]], SamplingParams(max_tokens=4))


def test_no_tokenizer_serves_ids_and_rejects_text(tiny_llama_notok_dir):
    llm = LLM(str(tiny_llama_notok_dir), progress=False, num_kv_blocks=64)
    out = llm.generate([1, 2, 3], SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)[0]
    assert len(out.token_ids) == 4 and out.text == ""
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("hello", SamplingParams(max_tokens=4))


def test_missing_model_and_bad_engine_args(tmp_path):
    with pytest.raises(ModelNotFoundError, match="supported"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(AssertionError, match="float32"):
        EngineArgs(dtype="bfloat16")
    with pytest.raises(AssertionError, match="quantization"):
        EngineArgs(quantization="int3")


def test_chat_and_generate_shapes(ckpt):
    llm = make_llm(ckpt)
    out = llm.chat([{"role": "user", "content": "Hello!"}], SamplingParams(max_tokens=5, **GREEDY))
    tok = llm.get_tokenizer()
    assert out.prompt_token_ids[0] == tok.bos_token_id  # <|im_start|> of the template
    assert len(out.token_ids) == 5 and out.finish_reason == "length" and isinstance(out.text, str)
    outs = llm.generate(["a", [4, 5, 6]], [SamplingParams(max_tokens=2), SamplingParams(max_tokens=3)],
                        use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [2, 3]
    assert outs[0].metrics.first_token_time >= outs[0].metrics.arrival_time
    info = llm.engine.model_info()
    assert info["architecture"] == "LlamaForCausalLM" and info["num_layers"] == 3
