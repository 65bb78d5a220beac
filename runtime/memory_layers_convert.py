"""convert-memory (issue 16 item 4, part): product-key memories trained elsewhere -> the issue-16 format.

lucidrains' `product-key-memory` (the `PKM` module; names and shapes read from its source, layout
of the version whose keys are (heads, num_keys, 2, dim_head/2)):
    to_queries.weight       (heads*dim_head, dim)   no bias
    norm.fn.{weight, bias, running_mean, running_var}  BatchNorm1d over the query (eval statistics)
    keys                    (heads, num_keys, 2, dim_head/2)
    values.weight           (num_keys**2, dim)      EmbeddingBag, mode "sum"
Its forward splits the *whole* query vector in two halves (`chunk(2)` over heads*dim_head) and then
per head, so half p of head h is query rows p*heads*dim_head/2 + h*dim_head/2 + [0, dim_head/2);
ours puts the halves inside each head (h*k_dim + p*k_dim/2 + ...). The converter folds the eval-mode
BatchNorm into query_proj (W' = W * gamma/sqrt(var+eps), bias' = beta - mean * gamma/sqrt(var+eps)),
permutes the rows to our order and the keys to (heads, 2, num_keys, dim_head/2); the output is the
bag itself (no value_proj, no swilu), so v_dim = dim must equal the base's hidden size. `topk` and
the BatchNorm eps are constructor arguments, not in the state dict: pass them (defaults = PKM's).
Not convertible: EvoNorm query norms (`use_evonorm=True`), named in the error.

Meta's lingua memory checkpoints (facebookresearch/memory): runtime/memory_layers_convert_lingua.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .loader import load_checkpoint
from .memory_layers import MemoryLayersConfig
from .memory_layers_init import write_memory_model

LUCIDRAINS_BN = ("norm.fn.weight", "norm.fn.bias", "norm.fn.running_mean", "norm.fn.running_var")


def _pkm_state(src, prefix: str) -> dict[str, torch.Tensor]:
    sd = src if isinstance(src, dict) else torch.load(src, map_location="cpu", weights_only=True)
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    need = ["to_queries.weight", "keys", "values.weight"]
    missing = [prefix + n for n in need if n not in out]
    if missing:
        raise ValueError(f"lucidrains PKM state dict lacks {missing} (prefix {prefix!r}; has {sorted(sd)[:6]}...)")
    if not all(n in out for n in LUCIDRAINS_BN):
        evo = sorted(n for n in out if n.startswith("norm."))
        raise ValueError(f"PKM at prefix {prefix!r}: query norm {evo or 'none'} is not the BatchNorm1d "
                         f"{[prefix + n for n in LUCIDRAINS_BN]}; EvoNorm (use_evonorm=True) cannot be converted")
    return out


def fold_batchnorm(W, bias, gamma, beta, mean, var, eps: float = 1e-5):
    """An eval-mode BatchNorm1d after the linear (W, bias) folded into it (float64): with a = gamma /
    sqrt(var + eps), W' = W * a (per output row), bias' = (bias - mean) * a + beta."""
    a = gamma.double() / torch.sqrt(var.double() + eps)
    return W.double() * a[:, None], (bias.double() - mean.double()) * a + beta.double()


def lucidrains_pkm_tensors(sd: dict[str, torch.Tensor], layer: int, bn_eps: float = 1e-5):
    """(our memory tensors of `layer`, heads, n_keys, k_dim, dim) from one PKM's state dict."""
    keys = sd["keys"].double()
    if keys.dim() != 4 or keys.shape[2] != 2:
        raise ValueError(f"PKM keys {tuple(keys.shape)}: expected (heads, num_keys, 2, dim_head/2)")
    H, n, _, half = keys.shape
    dh = 2 * half
    W = sd["to_queries.weight"].double()
    if W.shape[0] != H * dh:
        raise ValueError(f"PKM to_queries.weight {tuple(W.shape)}: expected ({H * dh}, dim) for {H} heads x {dh}")
    dim = W.shape[1]
    vals = sd["values.weight"]
    if tuple(vals.shape) != (n * n, dim):
        raise ValueError(f"PKM values.weight {tuple(vals.shape)}: expected (num_keys**2, dim) = {(n * n, dim)}")
    W, bias = fold_batchnorm(W, torch.zeros(W.shape[0], dtype=torch.float64), *(sd[k] for k in LUCIDRAINS_BN),
                             eps=bn_eps)
    # their row p*H*half + h*half + d -> ours h*dh + p*half + d
    W = W.view(2, H, half, dim).permute(1, 0, 2, 3).reshape(H * dh, dim)
    bias = bias.view(2, H, half).permute(1, 0, 2).reshape(H * dh)
    p = f"model.layers.{layer}.memory."
    tensors = {p + "query_proj.weight": W.float(), p + "query_proj.bias": bias.float(),
               p + "keys": keys.permute(0, 2, 1, 3).float().contiguous(),
               p + "values.weight": vals.float().contiguous()}
    return tensors, H, n, dh, dim


def convert_lucidrains(base: str, pkms: dict[int, tuple], out: str, mode: str = "replace", knn: int = 32,
                       bn_eps: float = 1e-5, progress: bool = True) -> Path:
    """`pkms`: {decoder layer: (state dict or .pt path, key prefix)}. Writes a memory model whose memory
    layers are those PKMs (`mode` "replace": the PKM is the layer's FFN, as in lucidrains' transformer;
    "parallel": MLP + PKM) on the dense `base`."""
    ck = load_checkpoint(base, progress=progress)
    c = ck.config
    if c.memory_layers is not None:
        raise ValueError(f"{base} already has memory_layers; convert-memory needs a dense base")
    state, tables, shapes = dict(ck.weights), {}, set()
    for layer, (src, prefix) in sorted(pkms.items()):
        t, H, n, dh, dim = lucidrains_pkm_tensors(_pkm_state(src, prefix), layer, bn_eps)
        if dim != c.hidden_size:
            raise ValueError(f"PKM for layer {layer}: dim {dim} != the base's hidden_size {c.hidden_size}")
        shapes.add((H, n, dh))
        vn = f"model.layers.{layer}.memory.values.weight"
        tables[vn] = t.pop(vn)
        state |= t
        if mode == "replace":
            for k in [k for k in state if k.startswith(f"model.layers.{layer}.mlp.")]:
                del state[k]
    if len(shapes) != 1:
        raise ValueError(f"the PKMs differ in (heads, num_keys, dim_head) {sorted(shapes)}; one memory_layers "
                         "config needs them equal")
    H, n, dh = shapes.pop()
    mem = {"layers": sorted(pkms), "mode": mode, "n_keys": n, "heads": H, "knn": knn, "k_dim": dh,
           "v_dim": c.hidden_size, "shared_values": False, "swilu": False}
    MemoryLayersConfig.from_dict(mem, c.hidden_size, c.num_hidden_layers)  # validates (names what to change)
    return write_memory_model(out, state, tables, c, mem, ck.tokenizer)
