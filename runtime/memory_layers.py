"""Memory layers (product-key memory, Lample et al. 2019; Memory+, Berges et al. 2024): the FFN-slot math.

Not the KV memory (runtime/kv_memory/): a memory layer is a learned (n_keys**2, v_dim) value table
read by product-key lookup in place of, or beside, a decoder layer's MLP (issue 16).

For the layer's post-attention-normed input x (T, hidden):
    q = query_proj(x) -> (T, heads, k_dim); pkm_topk -> per head knn slot indices + softmax weights;
    bag = sum over heads and slots of weight * values[index]            (a ValueStore lookup)
    out = value_proj(bag * silu(swilu_proj(x)))   (or value_proj(bag) without swilu; no value_proj = identity;
                                                    both projections may carry a bias)
    out *= sigmoid(gate(x))                        (optional per-token gate, lingua's mem_gated)

Value-table reads go through `ValueStore.submit(indices, weights).result() -> rows` (or the blocking
`lookup`) so a store can serve them from remote shards (issue 17). The decoder layer's FFN slot
(runtime/ffn.py) submits the read before it runs the dense MLP ("parallel" mode), so a remote read
overlaps the MLP.
"""

from __future__ import annotations

from concurrent.futures import Future
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
    """Where value rows live: the one interface every value-table read goes through.

    Contract (what a remote store of issue 17 implements):
      indices  (T, K) int64 slot ids in [0, num_rows)  (a remote store may send them as int32)
      weights  (T, K) fp32 per-slot weights            (K = heads * knn; the heads are summed)
      result   (T, dim) fp32: row t = sum_k weights[t, k] * table[indices[t, k]]
    `submit` starts the read and returns an object with `.result() -> rows` (a concurrent.futures.Future
    fits); the model calls it before the dense MLP and `.result()` after, so a store that sends the read
    over the network overlaps it with the MLP. The default `submit` wraps a blocking `lookup` in a
    completed future; a store defines `lookup`, `submit`, or both. `num_rows`, `dim`, `nbytes` and
    `dtype` (a name, e.g. "float32") describe the table."""

    num_rows: int
    dim: int

    def lookup(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if type(self).submit is ValueStore.submit:
            raise NotImplementedError(f"{type(self).__name__} defines neither lookup nor submit")
        return self.submit(indices, weights).result()

    def submit(self, indices: torch.Tensor, weights: torch.Tensor):
        f = Future()
        f.set_result(self.lookup(indices, weights))
        return f

    @property
    def nbytes(self) -> int:  # pragma: no cover
        raise NotImplementedError

    @property
    def dtype(self) -> str:
        return "unknown"


class TensorValueStore(ValueStore):
    """An in-process (rows, v_dim) table (fp32/bf16/fp16, or int8 with per-row fp32 `scales` (rows,),
    dequantized inside the bag; a memory-mapped tensor works unchanged)."""

    def __init__(self, table: torch.Tensor, scales: torch.Tensor | None = None):
        self.table, self.scales = table, scales
        self.num_rows, self.dim = table.shape

    def lookup(self, indices, weights):
        return embedding_bag(self.table, indices, weights, out_dtype=torch.float32, scales=self.scales)

    @property
    def nbytes(self) -> int:
        n = self.table.numel() * self.table.element_size()
        return n + (0 if self.scales is None else self.scales.numel() * self.scales.element_size())

    @property
    def dtype(self) -> str:
        return str(self.table.dtype).removeprefix("torch.")


class MemoryLayer:
    """One memory read: query_proj, keys, optional value_proj / swilu_proj (each with an optional bias), a
    (possibly shared) ValueStore."""

    __slots__ = ("cfg", "query_w", "query_b", "keys", "value_proj", "swilu_proj", "values", "value_bias",
                 "swilu_bias", "gate_w", "gate_b", "layer")

    def __init__(self, cfg: MemoryLayersConfig, query_w, query_b, keys, values: ValueStore,
                 value_proj=None, swilu_proj=None, value_bias=None, swilu_bias=None, gate_w=None, gate_b=None,
                 layer: int = -1):
        self.cfg = cfg
        self.query_w, self.query_b, self.keys = query_w, query_b, keys
        self.values, self.value_proj, self.swilu_proj = values, value_proj, swilu_proj
        self.value_bias, self.swilu_bias = value_bias, swilu_bias
        self.gate_w, self.gate_b = gate_w, gate_b  # optional scalar gate per token: out *= sigmoid(gate(x))
        self.layer = layer  # decoder layer index (per-layer lookup stats)

    def submit(self, x: torch.Tensor):
        """Query + product-key top-k, then start the value read; `finish(x, pending)` completes it."""
        c = self.cfg
        T = x.shape[0]
        q = F.linear(x, self.query_w, self.query_b).view(T, c.heads, c.k_dim)
        idx, w = pkm_topk(q, self.keys, c.knn)  # (T, heads*knn): summing heads = one bag over all columns
        return self.values.submit(idx, w)

    def finish(self, x: torch.Tensor, pending) -> torch.Tensor:
        bag = pending.result().to(x.dtype)  # (T, v_dim)
        if self.swilu_proj is not None:
            bag = bag * F.silu(F.linear(x, self.swilu_proj, self.swilu_bias))
        out = bag if self.value_proj is None else F.linear(bag, self.value_proj, self.value_bias)
        return out if self.gate_w is None else out * torch.sigmoid(F.linear(x, self.gate_w, self.gate_b))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(x, self.submit(x))
