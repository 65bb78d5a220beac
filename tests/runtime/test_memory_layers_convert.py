"""convert-memory from lucidrains' product-key-memory (issue 16 item 4): a tiny PKM state dict built here
with that project's tensor names and shapes (to_queries, BatchNorm1d query norm `norm.fn.*`, keys
(heads, num_keys, 2, dim_head/2), EmbeddingBag values), converted onto a tiny dense base; the converted
model's logits equal a float64 reference computed from the SOURCE tensors with PKM's own forward
(BatchNorm in eval mode, the whole query split in two halves, per-half top-k, product top-k, softmax,
sum bag), plugged into transformers' LlamaForCausalLM in place of the layer's MLP."""

import json
import sys
from pathlib import Path

import pytest
import torch
from memserve.runtime import LLM, SamplingParams
from memserve.runtime.memory_layers_convert import convert_lucidrains

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import make_tiny_model, prefill_logits  # noqa: E402

H, N, DH, TOPK, EPS = 2, 8, 16, 4, 1e-5


def pkm_state(dim, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=1.0: std * torch.randn(*s, generator=g)  # noqa: E731
    return {"pkm.to_queries.weight": r(H * DH, dim, std=0.3), "pkm.norm.fn.weight": 1 + 0.2 * r(H * DH),
            "pkm.norm.fn.bias": 0.2 * r(H * DH), "pkm.norm.fn.running_mean": 0.3 * r(H * DH),
            "pkm.norm.fn.running_var": 0.5 + torch.rand(H * DH, generator=g),
            "pkm.norm.fn.num_batches_tracked": torch.tensor(100), "pkm.keys": r(H, N, 2, DH // 2, std=0.5),
            "pkm.values.weight": r(N * N, dim)}


class RefPKM(torch.nn.Module):
    """lucidrains' PKM forward in float64 from its source tensors (eval mode, no dropout)."""

    def __init__(self, sd):
        super().__init__()
        self.sd = {k.removeprefix("pkm."): v.double() for k, v in sd.items()}

    def forward(self, x):  # (B, T, dim)
        s = self.sd
        B, T, _ = x.shape
        q = x @ s["to_queries.weight"].T
        q = (q - s["norm.fn.running_mean"]) / torch.sqrt(s["norm.fn.running_var"] + EPS) * s["norm.fn.weight"] \
            + s["norm.fn.bias"]
        q = torch.stack(q.chunk(2, dim=-1)).reshape(2, B, T, H, -1)  # halves over the whole query vector
        dots = torch.einsum("pbthd,hnpd->bthpn", q, s["keys"])
        sc, ix = dots.topk(TOPK, dim=-1)
        all_sc = (sc[:, :, :, 0, :, None] + sc[:, :, :, 1, None, :]).reshape(B, T, H, -1)
        all_ix = (ix[:, :, :, 0, :, None] * N + ix[:, :, :, 1, None, :]).reshape(B, T, H, -1)
        best, pos = all_sc.topk(TOPK, dim=-1)
        slots = all_ix.gather(-1, pos)
        w = best.softmax(-1)
        return (w[..., None] * s["values.weight"][slots]).sum((2, 3))  # (B, T, dim)


def reference(base, pkms, mode):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    raw = json.loads((base / "config.json").read_text())
    model = LlamaForCausalLM(LlamaConfig(**raw)).double().eval()
    sd = {k: v.double() for k, v in load_file(str(base / "model.safetensors")).items()}
    model.load_state_dict(sd, strict=False)
    model.lm_head.weight = model.model.embed_tokens.weight

    class Par(torch.nn.Module):
        def __init__(self, mlp, pkm):
            super().__init__()
            self.mlp, self.pkm = mlp, pkm

        def forward(self, x):
            return self.mlp(x) + self.pkm(x)

    for i, st in pkms.items():
        layer = model.model.layers[i]
        layer.mlp = RefPKM(st) if mode == "replace" else Par(layer.mlp, RefPKM(st))
    return model


@pytest.mark.parametrize("mode", ["replace", "parallel"])
def test_lucidrains_pkm_converted_logits_match_float64_reference(tmp_path, mode):
    base = make_tiny_model(tmp_path / "base", "llama", with_tokenizer=False)
    hidden = json.loads((base / "config.json").read_text())["hidden_size"]
    pkms = {0: pkm_state(hidden, 1), 2: pkm_state(hidden, 2)}
    torch.save(pkms[2], tmp_path / "pkm2.pt")  # one from a file (torch.load weights_only=True), one in memory
    out = convert_lucidrains(str(base), {0: (pkms[0], "pkm."), 2: (str(tmp_path / "pkm2.pt"), "pkm.")},
                             str(tmp_path / "conv"), mode=mode, knn=TOPK, progress=False)
    mem = json.loads((out / "config.json").read_text())["memory_layers"]
    assert mem | {} == {"layers": [0, 2], "mode": mode, "n_keys": N, "heads": H, "knn": TOPK, "k_dim": DH,
                        "v_dim": hidden, "shared_values": False, "swilu": False}
    ref = reference(base, pkms, mode)
    llm = LLM(str(out), progress=False, num_kv_blocks=64)
    ids = torch.randint(3, 1000, (15,), generator=torch.Generator().manual_seed(0)).tolist()
    got = prefill_logits(llm, ids).double()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
        plain = reference(base, {}, mode)(torch.tensor([ids])).logits[0]
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= 1e-4
    assert ((plain - want).abs().max() / want.abs().max()).item() > 0.05, "the PKMs must change the logits"
    outp = llm.generate([ids[:5]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    want_ids = list(ids[:5])
    with torch.no_grad():
        for _ in range(4):
            want_ids.append(int(ref(torch.tensor([want_ids])).logits[0, -1].argmax()))
    assert outp[0].token_ids == want_ids[5:]


def test_lucidrains_errors_name_what_to_change(tmp_path):
    base = make_tiny_model(tmp_path / "base", "llama", with_tokenizer=False)
    st = pkm_state(64, 0)
    evo = {k: v for k, v in st.items() if not k.startswith("pkm.norm.")} | {"pkm.norm.gamma": torch.ones(1)}
    with pytest.raises(ValueError, match="EvoNorm"):
        convert_lucidrains(str(base), {0: (evo, "pkm.")}, str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match=r"lacks \['pkm\.keys'\]"):
        convert_lucidrains(str(base), {0: ({k: v for k, v in st.items() if k != "pkm.keys"}, "pkm.")},
                           str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="dim 32 != the base's hidden_size 64"):
        convert_lucidrains(str(base), {0: (pkm_state(32, 0), "pkm.")}, str(tmp_path / "o"), progress=False)


def test_convert_memory_cli(tmp_path):
    from memserve.deploy.cli import main

    base = make_tiny_model(tmp_path / "base", "llama", with_tokenizer=False)
    torch.save({"layers.1.ff." + k.removeprefix("pkm."): v for k, v in pkm_state(64, 3).items()}, tmp_path / "m.pt")
    out = tmp_path / "conv"
    assert main(["convert-memory", "--base", str(base), "--pkm", f"1={tmp_path / 'm.pt'}#layers.1.ff.",
                 "--knn", str(TOPK), "--out", str(out)]) == 0
    mem = json.loads((out / "config.json").read_text())["memory_layers"]
    assert mem["layers"] == [1] and mem["mode"] == "replace" and mem["knn"] == TOPK
    assert main(["convert-memory", "--base", str(base), "--pkm", "x.pt", "--out", str(out)]) == 2
