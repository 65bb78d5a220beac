"""convert-memory from Meta's lingua memory code (facebookresearch/memory; issue 16 item 4): a tiny
checkpoint directory built here with lingua's names and shapes (params.json with model.productkey_args,
consolidated.pth = {"model": state dict}), converted; the converted model's logits (through the serving
engine) equal a float64 forward written in this test from lingua's formulas on the SOURCE tensors:
interleaved-pair RoPE, RMSNorm, GQA attention, SwiGLU w1/w3/w2, and HashingMemory (query_mlps.0 with
bias, keys (2*heads*n_keys, k_dim/2), per-half top-knn, product top-knn, fp32 softmax, sum bag,
value_proj(bag * silu(swilu_projection(x))) with their biases)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from memserve.runtime import LLM, SamplingParams
from memserve.runtime.memory_layers_convert_lingua import convert_lingua

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import prefill_logits  # noqa: E402

DIM, LAYERS, HEADS, KV, V = 64, 3, 4, 2, 300
MH, NK, KNN, KD = 2, 8, 4, 16
INTER = 256  # lingua: int(2 * 4 * 64 / 3) = 170 -> multiple_of 256


def lingua_params(shared=True, swilu=True, v_dim=-1, mem_layers="1", gated=False):
    return {"name": "tiny", "distributed": {"model_dtype": "bf16"},
            "model": {"dim": DIM, "n_layers": LAYERS, "head_dim": None, "n_heads": HEADS, "n_kv_heads": KV,
                      "ffn_dim_multiplier": None, "multiple_of": 256, "norm_eps": 1e-5, "rope_theta": 10000.0,
                      "max_seqlen": 256, "vocab_size": V, "weight_tying": False,
                      "productkey_args": {"is_enabled": True, "layers": mem_layers, "mem_n_keys": NK,
                                          "mem_heads": MH, "mem_knn": KNN, "mem_share_values": shared,
                                          "mem_k_dim": KD, "mem_v_dim": v_dim, "swilu_projection": swilu,
                                          "value_fixed_lr": 0.001, "mem_gated": gated, "peer_variant": False}}}


def lingua_state(params, seed=0):
    m, pk = params["model"], params["model"]["productkey_args"]
    mem = [int(s) for s in pk["layers"].split(",")]
    vd = pk["mem_v_dim"] if pk["mem_v_dim"] > 0 else DIM
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=1.0: std * torch.randn(*s, generator=g)  # noqa: E731
    hd = DIM // HEADS
    sd = {"tok_embeddings.weight": r(V, DIM), "norm.weight": 1 + 0.1 * r(DIM), "output.weight": r(V, DIM, std=0.2)}
    table = r(NK * NK, vd, std=1.0).to(torch.bfloat16)  # lingua's xFormerEmbeddingBag keeps the table in bf16
    for i in range(m["n_layers"]):
        s = f"layers.{i}."
        sd |= {s + "attention.wq.weight": r(HEADS * hd, DIM, std=0.2), s + "attention.wk.weight": r(KV * hd, DIM, std=0.2),
               s + "attention.wv.weight": r(KV * hd, DIM, std=0.2), s + "attention.wo.weight": r(DIM, HEADS * hd, std=0.2),
               s + "attention_norm.weight": 1 + 0.1 * r(DIM), s + "ffn_norm.weight": 1 + 0.1 * r(DIM)}
        f = s + "feed_forward."
        if i not in mem:
            sd |= {f + "w1.weight": r(INTER, DIM, std=0.15), f + "w3.weight": r(INTER, DIM, std=0.15),
                   f + "w2.weight": r(DIM, INTER, std=0.1)}
            continue
        sd |= {f + "keys": r(2 * MH * NK, KD // 2, std=0.5), f + "query_proj.query_mlps.0.weight": r(MH * KD, DIM, std=0.3),
               f + "query_proj.query_mlps.0.bias": r(MH * KD, std=0.3),
               f + "values.weight": table if pk["mem_share_values"] else r(NK * NK, vd).to(torch.bfloat16)}
        if pk["swilu_projection"] or pk["mem_v_dim"] > 0:
            sd |= {f + "value_proj.weight": r(DIM, vd, std=0.3), f + "value_proj.bias": r(DIM, std=0.3)}
        if pk["mem_gated"]:
            sd |= {f + "gating.weight": r(1, DIM, std=1.0), f + "gating.bias": r(1)}
        if pk["swilu_projection"]:
            sd |= {f + "swilu_projection.weight": r(vd, DIM, std=0.3), f + "swilu_projection.bias": r(vd, std=0.3)}
    return sd


def reference_logits(params, sd, ids):
    """lingua's forward in float64 from the source tensors (eval mode, sdpa causal attention)."""
    m, pk = params["model"], params["model"]["productkey_args"]
    mem = [int(s) for s in pk["layers"].split(",")]
    s = {k: v.double() for k, v in sd.items()}
    hd, eps, T = DIM // HEADS, m["norm_eps"], len(ids)

    def norm(x, w):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w

    freqs = 1.0 / (m["rope_theta"] ** (torch.arange(0, hd, 2).double() / hd))
    ang = torch.outer(torch.arange(T).double(), freqs)  # (T, hd/2)
    cos, sin = ang.cos(), ang.sin()

    def rope(x):  # (T, H, hd): rotate the interleaved pairs (2j, 2j+1) by angle j
        a, b = x[..., 0::2], x[..., 1::2]
        c, si = cos[:, None], sin[:, None]
        return torch.stack((a * c - b * si, a * si + b * c), -1).flatten(-2)

    h = s["tok_embeddings.weight"][ids]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(m["n_layers"]):
        p = f"layers.{i}."
        x = norm(h, s[p + "attention_norm.weight"])
        q = rope((x @ s[p + "attention.wq.weight"].T).view(T, HEADS, hd))
        k = rope((x @ s[p + "attention.wk.weight"].T).view(T, KV, hd)).repeat_interleave(HEADS // KV, 1)
        v = (x @ s[p + "attention.wv.weight"].T).view(T, KV, hd).repeat_interleave(HEADS // KV, 1)
        att = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
        o = torch.einsum("hts,shd->thd", att.masked_fill(~causal, float("-inf")).softmax(-1), v).reshape(T, -1)
        h = h + o @ s[p + "attention.wo.weight"].T
        x = norm(h, s[p + "ffn_norm.weight"])
        f = p + "feed_forward."
        if i not in mem:
            h = h + (torch.nn.functional.silu(x @ s[f + "w1.weight"].T) * (x @ s[f + "w3.weight"].T)) @ s[f + "w2.weight"].T
            continue
        qy = (x @ s[f + "query_proj.query_mlps.0.weight"].T + s[f + "query_proj.query_mlps.0.bias"]).view(T, MH, KD)
        keys = s[f + "keys"].view(MH, 2, NK, KD // 2)
        s1 = torch.einsum("thd,hnd->thn", qy[..., :KD // 2], keys[:, 0])
        s2 = torch.einsum("thd,hnd->thn", qy[..., KD // 2:], keys[:, 1])
        (v1, i1), (v2, i2) = s1.topk(KNN, -1), s2.topk(KNN, -1)
        allv = (v1[..., :, None] + v2[..., None, :]).reshape(T, MH, -1)
        alli = (i1[..., :, None] * NK + i2[..., None, :]).reshape(T, MH, -1)
        best, pos = allv.topk(KNN, -1)
        w = best.softmax(-1)
        table = s[f + "values.weight"] if f + "values.weight" in s else s[f"layers.{mem[0]}.feed_forward.values.weight"]
        bag = (w[..., None] * table[alli.gather(-1, pos)]).sum((1, 2))  # (T, v_dim)
        if pk["swilu_projection"]:
            bag = bag * torch.nn.functional.silu(x @ s[f + "swilu_projection.weight"].T + s[f + "swilu_projection.bias"])
        if pk["swilu_projection"] or pk["mem_v_dim"] > 0:
            bag = bag @ s[f + "value_proj.weight"].T + s[f + "value_proj.bias"]
        if pk["mem_gated"]:
            bag = torch.sigmoid(x @ s[f + "gating.weight"].T + s[f + "gating.bias"]) * bag
        h = h + bag
    return norm(h, s["norm.weight"]) @ s["output.weight"].T


def write_ckpt(d, params, sd):
    d.mkdir(parents=True)
    (d / "params.json").write_text(json.dumps(params))
    torch.save({"model": sd}, d / "consolidated.pth")
    return d


@pytest.mark.parametrize("shared,swilu,v_dim,layers,gated", [(True, True, -1, "0,2", False),
                                                               (False, False, -1, "1", False),
                                                               (True, False, 48, "1", True)])
def test_lingua_converted_logits_match_float64_reference(tmp_path, shared, swilu, v_dim, layers, gated):
    params = lingua_params(shared, swilu, v_dim, layers, gated)
    sd = lingua_state(params)
    if shared and "," in layers:  # a consolidated shared table may sit under the first memory layer only
        del sd[f"layers.{layers.split(',')[-1]}.feed_forward.values.weight"]
    out = convert_lingua(str(write_ckpt(tmp_path / "ck", params, sd)), str(tmp_path / "conv"))
    mem = json.loads((out / "config.json").read_text())["memory_layers"]
    assert mem == {"layers": [int(x) for x in layers.split(",")], "mode": "replace", "n_keys": NK, "heads": MH,
                   "knn": KNN, "k_dim": KD, "v_dim": v_dim if v_dim > 0 else DIM, "shared_values": shared,
                   "swilu": swilu}
    llm = LLM(str(out), progress=False, num_kv_blocks=64)
    ids = torch.randint(0, V, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    got = prefill_logits(llm, ids).double()
    with torch.no_grad():
        want = reference_logits(params, sd, ids)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= 1e-4, rel
    outp = llm.generate([ids[:6]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    want_ids = list(ids[:6])
    for _ in range(4):
        want_ids.append(int(reference_logits(params, sd, want_ids)[-1].argmax()))
    assert outp[0].token_ids == want_ids[6:]


def test_lingua_errors_name_what_to_change(tmp_path):
    params = lingua_params()
    sd = lingua_state(params)
    with pytest.raises(ValueError, match="params.json and consolidated.pth"):
        convert_lingua(str(tmp_path), str(tmp_path / "o"))
    bad = dict(sd)
    del bad["layers.1.feed_forward.keys"]
    with pytest.raises(ValueError, match=r"lacks layers\.1\.feed_forward\.keys \(expected shape \(32, 8\)\)"):
        convert_lingua(str(write_ckpt(tmp_path / "a", params, bad)), str(tmp_path / "o"))
    bad = dict(sd) | {"layers.1.feed_forward.values.weight": torch.zeros(NK * NK + 1, DIM)}
    with pytest.raises(ValueError, match=r"values\.weight has shape \(65, 64\); expected \(64, 64\)"):
        convert_lingua(str(write_ckpt(tmp_path / "b", params, bad)), str(tmp_path / "o"))
    peer = json.loads(json.dumps(params))
    peer["model"]["productkey_args"]["peer_variant"] = True
    with pytest.raises(ValueError, match="PEER"):
        convert_lingua(str(write_ckpt(tmp_path / "c", peer, sd)), str(tmp_path / "o"))


def test_convert_memory_cli_lingua(tmp_path):
    from memserve.deploy.cli import main

    params = lingua_params()
    ck = write_ckpt(tmp_path / "ck", params, lingua_state(params))
    out = tmp_path / "conv"
    assert main(["convert-memory", "--from", "lingua", "--checkpoint", str(ck), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["memory_layers"]["layers"] == [1]
    assert main(["convert-memory", "--from", "lingua", "--out", str(out)]) == 2  # no --checkpoint
