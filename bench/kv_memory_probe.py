"""Probe the KV memory on the real default model without the engine: per-layer rank of the needle's
block at the first decode step, and the greedy answer, for several selection variants.

    .venv/bin/python bench/kv_memory_probe.py --tokens 12000 --depth 0.5 --variants infllm,kvhead_sticky

A minimal single-sequence Llama forward (same weights as the engine, attention through KVLayerStore),
so selection variants can be measured while the engine is busy elsewhere. Chunked prefill.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_context_tasks import make_family_sample, make_sample, prompt_text, score  # noqa: E402
from memserve.runtime.attention import rope_inv_freq  # noqa: E402
from memserve.runtime.kv_memory import KVMemoryConfig, SequenceKVMemory  # noqa: E402
from memserve.runtime.loader import load_checkpoint  # noqa: E402
from memserve.scheduler.kv_policy import RetrievalPolicy  # noqa: E402

# name -> (policy kwargs, config kwargs)
VARIANTS = {
    "dense": (dict(topk=1), dict(n_local=10**9)),
    "allblocks": (dict(topk=10**6, sticky=False), {}),
    "stream": (dict(topk=0), {}),
    "infllm": (dict(granularity="shared", sticky=False), {}),
    "kvhead": (dict(granularity="kv_head", sticky=False), {}),
    "qhead": (dict(granularity="q_head", sticky=False), {}),
    "kvhead_sticky": (dict(granularity="kv_head", sticky=True), {}),
    "kvhead_max": (dict(granularity="kv_head", repr_mode="max", sticky=False), {}),
    "kvhead_max_sticky": (dict(granularity="kv_head", repr_mode="max", sticky=True), {}),
    "kvhead_max_sticky_next2": (dict(granularity="kv_head", repr_mode="max", sticky=True, next_blocks=2), {}),
    "kvhead_max_sticky_next4": (dict(granularity="kv_head", repr_mode="max", sticky=True, next_blocks=4), {}),
    "kvhead_max_sticky_next2_early": (dict(granularity="kv_head", repr_mode="max", sticky=True, next_blocks=2,
                                           layer_topk="early4x"), {}),
    "qhead_max_sticky": (dict(granularity="q_head", repr_mode="max", sticky=True), {}),
    # more blocks in the early layers, where the needle ranks worst (layers 0-5 get 4x topk)
    "kvhead_max_sticky_early": (dict(granularity="kv_head", repr_mode="max", sticky=True, layer_topk="early4x"), {}),
    "quest16": (dict(granularity="q_head", repr_mode="quest", sticky=False), dict(block_size=16)),
    "kvhead_bs32": (dict(granularity="kv_head", sticky=False, topk=64), dict(block_size=32)),
    "kvhead_max_bs32_sticky": (dict(granularity="kv_head", repr_mode="max", sticky=True, topk=64),
                               dict(block_size=32)),
}


class ProbeModel:
    def __init__(self, ckpt):
        self.c = ckpt.config
        self.w = ckpt.weights
        self.tok = ckpt.tokenizer
        self.inv_freq = rope_inv_freq(self.c.head_dim, self.c.rope_theta, self.c.rope_scaling)
        self.lm_head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])

    def _norm(self, x, w):
        return F.rms_norm(x, (x.shape[-1],), w, self.c.rms_norm_eps)

    def forward(self, ids: torch.Tensor, mem: SequenceKVMemory, p0: int) -> torch.Tensor:
        c, w = self.c, self.w
        t = ids.shape[0]
        x = w["model.embed_tokens.weight"][ids]  # (T, H)
        for i in range(c.num_hidden_layers):
            pre = f"model.layers.{i}."
            h = self._norm(x, w[pre + "input_layernorm.weight"])
            q = F.linear(h, w[pre + "self_attn.q_proj.weight"], w.get(pre + "self_attn.q_proj.bias"))
            k = F.linear(h, w[pre + "self_attn.k_proj.weight"], w.get(pre + "self_attn.k_proj.bias"))
            v = F.linear(h, w[pre + "self_attn.v_proj.weight"], w.get(pre + "self_attn.v_proj.bias"))
            q = q.view(t, c.num_attention_heads, c.head_dim)  # (T, Hq, D)
            k = k.view(t, c.num_key_value_heads, c.head_dim)
            v = v.view(t, c.num_key_value_heads, c.head_dim)
            a = mem.layers[i].attend(q, k, v, p0, self.inv_freq, c.head_dim**-0.5)
            x = x + F.linear(a.reshape(t, -1), w[pre + "self_attn.o_proj.weight"])
            h = self._norm(x, w[pre + "post_attention_layernorm.weight"])
            g = F.linear(h, w[pre + "mlp.gate_proj.weight"])
            u = F.linear(h, w[pre + "mlp.up_proj.weight"])
            x = x + F.linear(F.silu(g) * u, w[pre + "mlp.down_proj.weight"])
        x = self._norm(x[-1:], w["model.norm.weight"])
        return F.linear(x, self.lm_head)[0]


def needle_ranks(mem: SequenceKVMemory, needle_pos: int, granularity: str, per_unit: list | None = None) -> list[int]:
    """Rank (0 = best) of the needle's block under the last recorded scores, per layer (-1: in window).

    per_unit (a list): gets, per layer, the rank in every selection unit (KV head / q head), and the number of
    blocks, so one sees whether a few heads find the needle (retrieval heads) or none does."""
    from memserve.runtime.kv_memory.selection import select_blocks  # noqa: F401 (same aggregation)

    out = []
    for lm in mem.layers:
        s = getattr(lm, "last_scores", None)
        if s is None or lm.num_blocks == 0:
            out.append(-1)
            continue
        bp = lm.block_pos.get()
        hit = ((bp <= needle_pos) & (bp + lm.cfg.block_size > needle_pos)).nonzero()
        if hit.numel() == 0:
            out.append(-1)
            continue
        b = int(hit[0])
        hq = s.shape[0]
        g = hq // lm.hkv
        if granularity == "shared":
            agg = s.sum(0, keepdim=True)
        elif granularity == "kv_head":
            agg = s.reshape(lm.hkv, g, -1).sum(1)
        else:
            agg = s
        ranks = (agg > agg[:, b : b + 1]).sum(1)  # per selection unit
        if per_unit is not None:
            per_unit.append(dict(layer=len(out), blocks=lm.num_blocks, ranks=ranks.tolist()))
        out.append(int(ranks.min()))  # best unit: the needle is reachable if any head group picks it
    return out


def run(model: ProbeModel, variant: str, tokens: int, depth: float, seed: int, n_local: int, chunk: int,
        max_new: int, compression: str, task: str = "passkey", topk: int = 16, extra_cfg: dict | None = None,
        family: str | None = None, pol_extra: dict | None = None):
    pol_kw, cfg_kw = VARIANTS[variant]
    cfg_kw = {"n_local": n_local, "compression": compression, **(extra_cfg or {}), **cfg_kw}
    pol_kw = {**pol_kw, **(pol_extra or {})}
    if pol_kw.get("layer_topk") == "early4x":
        pol_kw["layer_topk"] = tuple((i, 4 * topk) for i in range(6))
    pol = RetrievalPolicy(**{"topk": topk, **pol_kw})
    cfg = KVMemoryConfig(policy=pol, **cfg_kw)
    c = model.c
    mem = SequenceKVMemory(cfg, c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
    for lm in mem.layers:
        lm.record_scores = True
    sample = (make_family_sample(family, task, model.tok, tokens, depth, seed) if family
              else make_sample(task, model.tok, tokens, depth, seed))
    ids = model.tok.encode(prompt_text(sample, model.tok))
    # needle position: tokens before the needle text
    needle_text = sample.answers[0]
    full = prompt_text(sample, model.tok)
    cut = full.index(needle_text)
    needle_pos = len(model.tok.encode(full[:cut]))
    t0 = time.time()
    p = 0
    logits = None
    while p < len(ids):
        n = min(chunk, len(ids) - p)
        logits = model.forward(torch.tensor(ids[p : p + n]), mem, p)
        p += n
    t_prefill = time.time() - t0
    out = []
    ranks, per_unit = None, []
    for step in range(max_new):
        nxt = int(logits.argmax())
        out.append(nxt)
        if nxt in model.tok.eos_token_ids:
            break
        logits = model.forward(torch.tensor([nxt]), mem, p)
        p += 1
        if step == 0:
            ranks = needle_ranks(mem, needle_pos, pol.granularity, per_unit)
    text = model.tok.decode(out)
    return dict(variant=variant, tokens=len(ids), depth=depth, answer=sample.answers[0], output=text,
                score=score(sample, text), ranks=ranks, per_unit=per_unit, prefill_s=t_prefill,
                decode_s=(time.time() - t0 - t_prefill), mem_bytes=mem.tier_bytes())


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--depths", default="0.5")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--variants", default="infllm,kvhead_sticky")
    ap.add_argument("--n-local", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--max-new", type=int, default=8)
    ap.add_argument("--compression", default="none")
    ap.add_argument("--task", default="passkey")
    ap.add_argument("--family", default=None, help="filler family (bench/filler_families.py); task from FAMILY_TASKS")
    ap.add_argument("--policy", default="{}", help='RetrievalPolicy overrides as JSON, e.g. {"topk": 32}')
    ap.add_argument("--json-out", default=None, help="append each result (with per-head ranks) as a JSON line")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--n-init", type=int, default=128)
    ap.add_argument("--kv-config", default="{}", help='more KVMemoryConfig fields as JSON, e.g. {"value_group": 32}')
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = ProbeModel(load_checkpoint("default", progress=False))
    for v in a.variants.split(","):
        for d in a.depths.split(","):
            for s in a.seeds.split(","):
                with torch.inference_mode():
                    r = run(model, v, a.tokens, float(d), int(s), a.n_local, a.chunk, a.max_new,
                            a.compression, a.task, a.topk, {"block_size": a.block_size, "n_init": a.n_init, **json.loads(a.kv_config)},
                            a.family, json.loads(a.policy))
                print(f"{r['variant']:24s} tok={r['tokens']} depth={r['depth']:.2f} score={r['score']:.0f} "
                      f"ans={r['answer']} out={r['output']!r} prefill={r['prefill_s']:.0f}s", flush=True)
                print(f"   ranks={r['ranks']}", flush=True)
                if a.json_out:
                    with open(a.json_out, "a") as f:
                        f.write(json.dumps({**r, "family": a.family, "task": a.task, "policy": a.policy,
                                            "kv_config": a.kv_config, "n_local": a.n_local}) + "\n")


if __name__ == "__main__":
    main()
