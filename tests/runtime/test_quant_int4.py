"""int4 linears (runtime/quant_int4.py): vs fp32, vs llama.cpp's Q4_0/Q4_1 dequantization, kernel choice
by rows, GGUF codes kept through the loader (incl. llama.cpp's q/k row permutation), the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from memserve.runtime import LLM, SamplingParams
from memserve.runtime.engine import EngineArgs
from memserve.runtime.loader import load_checkpoint
from memserve.runtime.quant import Int8Linear, Linear
from memserve.runtime.quant_int4 import (
    GGUFQ4Blocks,
    Int4Linear,
    Int4Options,
    codes_from_gguf,
    make_int4_linear,
    quantize_int4_groups,
)
from tiny_models import make_tiny_model, write_tiny_gguf

torch.set_num_threads(1)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _llama_cpp_dequant(raw: np.ndarray, qtype: str, n: int, k: int) -> np.ndarray:
    """ggml's dequantize_row_q4_0 / q4_1, written from its formula: per block of 32, f16 d (and f16 m),
    then 16 bytes; byte j's low nibble is x[j], its high nibble x[j + 16];
    Q4_0: x = (q - 8) * d;  Q4_1: x = q * d + m."""
    bpb = 18 if qtype == "Q4_0" else 20
    out = np.empty((n, k), dtype=np.float64)
    blocks = raw.reshape(n, k // 32, bpb)
    for r in range(n):
        for b in range(k // 32):
            blk = blocks[r, b]
            d = float(blk[0:2].view(np.float16)[0])
            m = float(blk[2:4].view(np.float16)[0]) if qtype == "Q4_1" else 0.0
            qs = blk[bpb - 16:]
            for j in range(16):
                lo, hi = int(qs[j]) & 0xF, int(qs[j]) >> 4
                if qtype == "Q4_0":
                    out[r, b * 32 + j], out[r, b * 32 + j + 16] = (lo - 8) * d, (hi - 8) * d
                else:
                    out[r, b * 32 + j], out[r, b * 32 + j + 16] = lo * d + m, hi * d + m
    return out


@pytest.mark.parametrize("group", [32, 64])
def test_int4_linear_vs_fp32(group):
    """Group-quantized from fp32: within 4-bit rounding of the fp32 linear (measured 0.085 rel. at
    group 32, 0.10 at 64 on N(0,1) weights; bound 0.12), and within bf16 (activations, scales) of
    the dequantized weights it stands for, computed here in float64 from codes/scales (bound 1e-2)."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 192, generator=g), torch.randn(3, 192, generator=g)
    q, s, z = quantize_int4_groups(w, group)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    lin = Int4Linear(q, s, z, group)
    y = lin(x)
    assert y.dtype == torch.float32 and y.shape == (3, 96)
    assert _rel(y, x @ w.T) < 0.12
    deq = ((q.double().view(96, -1, group) - 8) * s.double()[..., None] + z.double()[..., None]).view(96, 192)
    assert _rel(y, x.double() @ deq.T) < 1e-2
    assert _rel(lin.dequantized(), deq) < 1e-2
    # and a wrong reference is told apart: the fp32 weights with one group's codes off by one
    bad = deq.clone()
    bad[:, :group] += s.double()[:, :1]
    assert _rel(y, x.double() @ bad.T) > 2e-2


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_0"])
def test_gguf_blocks_vs_llama_cpp_formula(qtype):
    """Codes taken from GGUF blocks (gguf.quants' Q4 quantizer) compute x @ W^T with W = llama.cpp's
    dequantization of those blocks, within bf16 rounding of scales and activations (bound 1e-2)."""
    import gguf

    rng = np.random.default_rng(1)
    n, k = 48, 128
    w = rng.standard_normal((n, k)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
    ref_w = _llama_cpp_dequant(raw, qtype, n, k)
    # gguf's own dequantizer agrees with the formula (what the fp32 path loads)
    assert np.allclose(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]), ref_w, atol=1e-6)
    lin = make_int4_linear(None, None, Int4Options(large_kernel="none"), [GGUFQ4Blocks(qtype, raw, (n, k))])
    x = torch.from_numpy(rng.standard_normal((2, k)))
    assert _rel(lin(x.float()), x @ torch.from_numpy(ref_w).T) < 1e-2
    # the codes are the file's: exactly llama.cpp's weights before the scales' bf16 rounding
    q, d, z = codes_from_gguf(GGUFQ4Blocks(qtype, raw, (n, k)))
    deq = (q.double().view(n, -1, 32) - 8) * d.double()[..., None] + z.double()[..., None]
    assert np.abs(deq.view(n, k).numpy() - ref_w).max() < 1e-5


def test_kernel_choice_by_rows():
    """Calls with <= max_small_tokens rows run the int4 op; larger ones the second copy, bit for bit."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 96, generator=g)
    for kind, cls in (("int8", Int8Linear), ("fp32", Linear)):
        lin = make_int4_linear(w, None, Int4Options(large_kernel=kind, max_small_tokens=4))
        assert isinstance(lin.large, cls)
        small, big = torch.randn(4, 96, generator=g), torch.randn(5, 96, generator=g)
        assert torch.equal(lin(small), lin.int4(small))
        assert torch.equal(lin(big), lin.large(big))
        assert lin.nbytes == lin.int4_nbytes + lin.large.nbytes
    only = make_int4_linear(w, None, Int4Options(large_kernel="none"))
    x = torch.randn(64, 96, generator=g)
    assert only.large is None and torch.equal(only(x), only.int4(x))
    # int4 bytes: half a byte per weight + bf16 scale and zero per group of 32
    assert only.nbytes == 64 * 96 // 2 + 64 * 96 // 32 * 4


def test_bad_int4_arguments():
    with pytest.raises(ValueError, match="int4_group"):
        EngineArgs(quantization="int4", int4_group=48)
    with pytest.raises(ValueError, match="large_kernel"):
        EngineArgs(quantization="int4", int4_large_kernel="bf16")
    with pytest.raises(ValueError, match="divide the input size 80"):
        quantize_int4_groups(torch.randn(16, 80), 32)
    with pytest.raises(ValueError, match="divisible by 16"):
        Int4Linear(*quantize_int4_groups(torch.randn(24, 64), 32), 32)
    with pytest.raises(AssertionError, match="quantization must be None, 'int8' or 'int4'"):
        EngineArgs(quantization="int3")


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory):
    """A tiny llama (q/k rows permuted by the converter) with every linear Q4_1 (embedding F32)."""
    d = tmp_path_factory.mktemp("int4")
    hf = make_tiny_model(d / "hf", "llama", tied=False, with_tokenizer=False)
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "output")
    return write_tiny_gguf(hf, d / "q41.gguf", {k: "Q4_1" for k in kinds}, with_tokenizer=False)


def test_engine_int4_keeps_gguf_codes(q4_gguf):
    """From a Q4_1 GGUF the int4 weights are the file's codes: the fp32 engine's weights (the same file
    dequantized to fp32) within the bf16 rounding of the scales, in every fused linear — q/k rows
    un-permuted like the fp32 ones. Logits: within bf16 activations of the fp32 engine."""
    from memserve.runtime.engine import LLMEngine

    fp = LLMEngine(load_checkpoint(str(q4_gguf), progress=False), progress=False, kv_memory="off")
    i4 = LLMEngine(load_checkpoint(str(q4_gguf), progress=False), progress=False, kv_memory="off",
                   quantization="int4", int4_large_kernel="none")
    assert load_checkpoint(str(q4_gguf), progress=False).q4_blocks  # the loader kept the blocks
    for Lf, L4 in zip(fp.model.layers, i4.model.layers):
        for name in ("qkv", "o", "gate_up", "down"):
            a, b = getattr(Lf, name).weight, getattr(L4, name).dequantized()
            err = float((a - b).abs().max() / a.abs().max())
            # (a wrong q/k row order is ~1 off; Q4_1 blocks re-quantized by min/max would mostly give the
            # same codes, so test_gguf_blocks_vs_llama_cpp_formula checks the codes themselves)
            assert err < 8e-3, (name, err)
    assert float((fp.model.lm_head.weight - i4.model.lm_head.dequantized()).abs().max()) < 8e-3 * float(
        fp.model.lm_head.weight.abs().max())
    ids = [5, 17, 300, 4000, 12]
    from memserve.runtime.attention import AttentionMetadata

    def logits(eng):
        meta = AttentionMetadata.build(["s"], [len(ids)], [0], [[1]], eng.allocator.block_size)
        return eng.model.forward(torch.tensor(ids), meta, eng.attn)

    assert _rel(logits(i4), logits(fp)) < 2e-2


def test_llm_int4_generates_on_tiny_model(q4_gguf):
    """int4 with the int8 copy for prefill (5 rows) and int4 decode: greedy tokens mostly match fp32."""
    out = {}
    for q in (None, "int4"):
        llm = LLM(str(q4_gguf), progress=False, kv_memory="off", quantization=q)
        out[q] = llm.generate([[5, 17, 300, 4000, 12]], SamplingParams(max_tokens=8, temperature=0),
                              use_tqdm=False)[0].token_ids
    assert len(out["int4"]) == 8
    assert out["int4"][:2] == out[None][:2], out


@pytest.mark.slow
def test_default_model_int4_vs_fp32():
    """int4 (every call on the int4 op, as in decode) vs fp32 on the default model (Q4_1 GGUF: both run the
    file's codes; int4 adds bf16 scales, activations and outputs). Greedy agreement is REPORTED, not bounded:
    measured 2026-12-07 on the EPYC: tokens before the first difference [10, 13, 0, 16] of 16 ("Water boils
    at": fp32's margin between its top two logits is 0.07 there). Bounded, teacher-forced on fp32's greedy
    tokens (measured: relative logit error <= 0.18, mean 0.08; int4 picks fp32's token at 82-94% of the
    positions; fp32's token always within int4's top 3): error < 0.25, agreement >= 0.75, top-3 always."""
    from memserve.runtime.attention import AttentionMetadata

    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time"]
    sp = SamplingParams(max_tokens=16, temperature=0)
    fp = LLM("default", progress=False, kv_memory="off")
    i4 = LLM("default", progress=False, kv_memory="off", quantization="int4", int4_large_kernel="none")
    ref, got = (llm.generate(prompts, sp, use_tqdm=False) for llm in (fp, i4))
    agree = [next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
             for a, b in zip(ref, got)]
    print("int4 vs fp32 greedy agreement (tokens before the first difference, of 16):", agree)

    def logits(llm, ids):
        e = llm.engine
        blocks = list(range(1, 1 + -(-len(ids) // e.allocator.block_size)))
        return e.model.forward(torch.tensor(ids), AttentionMetadata.build(["s"], [len(ids)], [0], [blocks],
                                                                          e.allocator.block_size), e.attn)

    for o in ref:
        ids, n = o.prompt_token_ids + o.token_ids, len(o.prompt_token_ids) - 1
        lf, l4 = logits(fp, ids)[n:], logits(i4, ids)[n:]  # the rows that predicted fp32's 17 tokens
        rel = (l4 - lf).norm(dim=-1) / lf.norm(dim=-1)
        top1 = lf.argmax(-1)
        rank = (l4 > l4.gather(1, top1[:, None])).sum(-1)
        same = float((l4.argmax(-1) == top1).float().mean())
        print(f"  {o.prompt!r}: rel. logit error max {float(rel.max()):.3f}, top-1 agreement {same:.2f}")
        assert float(rel.max()) < 0.25 and same >= 0.75 and int(rank.max()) <= 2, (o.prompt, rel, same, rank)
