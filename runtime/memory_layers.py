"""Memory layers (product-key memory, Lample et al. 2019; Memory+, Berges et al. 2024): the FFN-slot math.

Not the KV memory (runtime/kv_memory/): a memory layer is a learned (n_keys**2, v_dim) value table
read by product-key lookup in place of, or beside, a decoder layer's MLP (issue 16).

For the layer's post-attention-normed input x (T, hidden):
    q = query_proj(x) -> (T, heads, k_dim); pkm_topk -> per head knn slot indices + softmax weights;
    bag = sum over heads and slots of weight * values[index]            (a ValueStore lookup)
    out = value_proj(bag * silu(swilu_proj(x)))   (or value_proj(bag) without swilu; no value_proj = identity)

Value-table reads go through `ValueStore.lookup(indices, weights) -> rows` so a later store can serve
them from remote shards. This module holds the config, the in-process store and the layer; wiring it
into `Model` and the loader is the next step of issue 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import embedding_bag, pkm_topk
from .errors import UnsupportedModelError

MODES = ("replace", "parallel")


@dataclass(slots=True)
class MemoryLayersConfig:
    """config.json's `memory_layers` object (the public checkpoint contract of issue 16)."""

    layers: list[int]
    mode: str
    n_keys: int
    heads: int
    knn: int
    k_dim: int
    v_dim: int
    shared_values: bool = True
    swilu: bool = True

    @property
    def num_slots(self) -> int:
        return self.n_keys * self.n_keys

    @classmethod
    def from_dict(cls, d: dict, hidden_size: int, num_layers: int) -> MemoryLayersConfig:
        need = ("layers", "mode", "n_keys", "heads", "knn", "k_dim")
        missing = [k for k in need if k not in d]
        if missing:
            raise UnsupportedModelError(f"config.json memory_layers lacks {missing}; it needs {list(need)}")
        c = cls(layers=[int(i) for i in d["layers"]], mode=d["mode"], n_keys=int(d["n_keys"]),
                heads=int(d["heads"]), knn=int(d["knn"]), k_dim=int(d["k_dim"]),
                v_dim=int(d.get("v_dim") or hidden_size), shared_values=bool(d.get("shared_values", True)),
                swilu=bool(d.get("swilu", True)))
        if c.mode not in MODES:
            raise UnsupportedModelError(f"memory_layers.mode {c.mode!r}: expected one of {MODES}")
        bad = [i for i in c.layers if not 0 <= i < num_layers]
        if bad or len(set(c.layers)) != len(c.layers):
            raise UnsupportedModelError(f"memory_layers.layers {c.layers}: need distinct ids in [0, {num_layers})")
        if c.k_dim % 2 or not 1 <= c.knn <= c.n_keys:
            raise UnsupportedModelError(f"memory_layers: k_dim ({c.k_dim}) must be even and knn ({c.knn}) "
                                        f"in [1, n_keys={c.n_keys}]")
        return c


class ValueStore:
    """Where value rows live. `lookup(indices (T, K) int64, weights (T, K) fp32) -> (T, v_dim) fp32`."""

    num_rows: int
    dim: int

    def lookup(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def nbytes(self) -> int:  # pragma: no cover
        raise NotImplementedError


class TensorValueStore(ValueStore):
    """An in-process (rows, v_dim) table (fp32/bf16/fp16; a memory-mapped tensor works unchanged)."""

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.num_rows, self.dim = table.shape

    def lookup(self, indices, weights):
        return embedding_bag(self.table, indices, weights, out_dtype=torch.float32)

    @property
    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()


class MemoryLayer:
    """One memory read: query_proj, keys, optional value_proj / swilu_proj, a (possibly shared) ValueStore."""

    __slots__ = ("cfg", "query_w", "query_b", "keys", "value_proj", "swilu_proj", "values")

    def __init__(self, cfg: MemoryLayersConfig, query_w, query_b, keys, values: ValueStore,
                 value_proj=None, swilu_proj=None):
        self.cfg = cfg
        self.query_w, self.query_b, self.keys = query_w, query_b, keys
        self.values, self.value_proj, self.swilu_proj = values, value_proj, swilu_proj

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        T = x.shape[0]
        q = F.linear(x, self.query_w, self.query_b).view(T, c.heads, c.k_dim)
        idx, w = pkm_topk(q, self.keys, c.knn)  # (T, heads*knn): summing heads = one bag over all columns
        bag = self.values.lookup(idx, w).to(x.dtype)  # (T, v_dim)
        if self.swilu_proj is not None:
            bag = bag * F.silu(F.linear(x, self.swilu_proj))
        return bag if self.value_proj is None else F.linear(bag, self.value_proj)
