"""A decoder layer's FFN slot: dense MLP, memory layer, or MLP + memory (issue 16).

    FFN(gate_up, down, None)                       dense SwiGLU MLP (every layer of a dense model)
    FFN(None, None, memory)                        "replace": the memory is the layer's FFN
    FFN(gate_up, down, memory)                     "parallel": MLP output + memory output

In "parallel" mode the memory's value read is submitted *before* the MLP runs and collected after,
so a ValueStore that reads remote shards (issue 17) overlaps the network with the MLP.

Tensor names (the public checkpoint contract, config.json `memory_layers`):
    model.memory_values.weight (shared_values) | model.layers.{i}.memory.values.weight   (n_keys**2, v_dim)
    model.layers.{i}.memory.query_proj.weight (heads*k_dim, hidden) [+ .bias (heads*k_dim,)]
    model.layers.{i}.memory.keys (heads, 2, n_keys, k_dim/2)
    model.layers.{i}.memory.value_proj.weight (hidden, v_dim)   optional: absent = identity (v_dim == hidden)
    model.layers.{i}.memory.swilu_proj.weight (v_dim, hidden)   when swilu
    optional biases: …value_proj.bias (hidden,), …swilu_proj.bias (v_dim,)  (Meta's lingua memories have
    them: nn.Linear defaults; absent = zero)
    optional gate: …memory.gate.weight (1, hidden) [+ .bias (1,)]: out *= sigmoid(gate(x)) (lingua's
    mem_gated; memorize trains one so the memory stays silent on general text)
int8 value tables: the table tensor above stored as I8 (n_keys**2, v_dim) plus its per-row scales
    model.memory_values.scales | model.layers.{i}.memory.values.scales             (n_keys**2,) F32
    (row r = weight[r] * scales[r]; symmetric, scale = max|row| / 127; `memserve init-memory
    --values-dtype int8` writes them; a scales tensor next to a float table is an error)
"""

from __future__ import annotations

import bisect
import time

import torch
import torch.nn.functional as F

from .engine_protocol import LOOKUP_SECONDS_BUCKETS
from .memory_layers import MemoryLayer, MemoryLayersConfig, TensorValueStore, ValueStore

SHARED_VALUES = "model.memory_values.weight"


def values_name(cfg: MemoryLayersConfig, layer: int) -> str:
    return SHARED_VALUES if cfg.shared_values else f"model.layers.{layer}.memory.values.weight"


def is_values_name(name: str) -> bool:
    return name == SHARED_VALUES or (name.startswith("model.layers.") and name.endswith(".memory.values.weight"))


def scales_name(values: str) -> str:
    """The per-row scales tensor of an int8 value table `values` (…values.weight -> …values.scales)."""
    return values.removesuffix(".weight") + ".scales"


def is_scales_name(name: str) -> bool:
    return name.endswith(".scales") and is_values_name(name.removesuffix(".scales") + ".weight")


def memory_weight_shapes(cfg: MemoryLayersConfig, hidden: int, layer: int) -> dict[str, tuple[int, ...]]:
    """Required memory tensors of one layer (value_proj and query bias are optional; see loader)."""
    p = f"model.layers.{layer}.memory."
    shapes = {
        values_name(cfg, layer): (cfg.num_slots, cfg.v_dim),
        p + "query_proj.weight": (cfg.heads * cfg.k_dim, hidden),
        p + "keys": (cfg.heads, 2, cfg.n_keys, cfg.k_dim // 2),
    }
    if cfg.swilu:
        shapes[p + "swilu_proj.weight"] = (cfg.v_dim, hidden)
    return shapes


def optional_memory_shapes(cfg: MemoryLayersConfig, hidden: int, layer: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{layer}.memory."
    opt = {p + "query_proj.bias": (cfg.heads * cfg.k_dim,), p + "value_proj.weight": (hidden, cfg.v_dim),
           p + "value_proj.bias": (hidden,), scales_name(values_name(cfg, layer)): (cfg.num_slots,),
           p + "gate.weight": (1, hidden), p + "gate.bias": (1,)}
    if cfg.swilu:
        opt[p + "swilu_proj.bias"] = (cfg.v_dim,)
    return opt




class LookupStats:
    """Counts memory reads (one per memory layer per forward) and the time spent waiting on them: totals,
    per decoder layer ({layer: [reads, seconds]}) and a histogram of one read's seconds (`bucket_counts[k]`
    = reads with LOOKUP_SECONDS_BUCKETS[k-1] < seconds <= LOOKUP_SECONDS_BUCKETS[k]; the last is +Inf),
    also per layer with each bucket's seconds (`layer_buckets[layer][k] = [reads, seconds]`: what the
    serving metrics replay into a Prometheus histogram, exactly - see deploy/worker.py)."""

    __slots__ = ("lookups_total", "lookup_seconds_total", "per_layer", "bucket_counts", "layer_buckets")

    def __init__(self):
        self.lookups_total = 0
        self.lookup_seconds_total = 0.0
        self.per_layer: dict[int, list] = {}
        self.bucket_counts = [0] * (len(LOOKUP_SECONDS_BUCKETS) + 1)
        self.layer_buckets: dict[int, list[list]] = {}

    def record(self, layer: int, seconds: float) -> None:
        self.lookups_total += 1
        self.lookup_seconds_total += seconds
        c = self.per_layer.setdefault(layer, [0, 0.0])
        c[0] += 1
        c[1] += seconds
        k = bisect.bisect_left(LOOKUP_SECONDS_BUCKETS, seconds)
        self.bucket_counts[k] += 1
        b = self.layer_buckets.setdefault(layer, [[0, 0.0] for _ in range(len(LOOKUP_SECONDS_BUCKETS) + 1)])[k]
        b[0] += 1
        b[1] += seconds

    def layer_histograms(self) -> dict[int, list[tuple[int, float]]]:
        """A copy of `layer_buckets` ({layer: [(reads, seconds) per bucket]}) for EngineStats."""
        return {i: [(n, s) for n, s in b] for i, b in list(self.layer_buckets.items())}  # list(): atomic vs record()


class FFN:
    __slots__ = ("gate_up", "down", "inter", "memory", "stats")

    def __init__(self, gate_up, down, inter: int, memory: MemoryLayer | None = None,
                 stats: LookupStats | None = None):
        self.gate_up, self.down, self.inter, self.memory = gate_up, down, inter, memory
        self.stats = stats

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up(x)  # (T, 2I)
        return self.down(F.silu(gu[:, :self.inter]) * gu[:, self.inter:])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.memory
        if m is None:
            return self.mlp(x)
        t0 = time.perf_counter()
        pending = m.submit(x)  # starts the value read (remote stores: on the wire now)
        t_sub = time.perf_counter() - t0
        y = self.mlp(x) if self.gate_up is not None else None
        t1 = time.perf_counter()
        out = m.finish(x, pending)
        if self.stats is not None:
            self.stats.record(m.layer, t_sub + time.perf_counter() - t1)
        return out if y is None else y + out


def build_memory_layers(cfg: MemoryLayersConfig, hidden: int, w, has) -> tuple[dict[int, MemoryLayer],
                                                                             dict[str, ValueStore]]:
    """Memory layers from weights. `w(name)` returns a tensor in the model dtype/device; `has(name)` tells
    whether an optional tensor exists. Value tables are taken as stored (see `values_table`)."""
    stores: dict[str, ValueStore] = {}
    layers: dict[int, MemoryLayer] = {}
    for i in cfg.layers:
        vname = values_name(cfg, i)
        if vname not in stores:
            sname = scales_name(vname)
            stores[vname] = TensorValueStore(w(vname, keep_dtype=True),
                                             w(sname, keep_dtype=True) if has(sname) else None)
        p = f"model.layers.{i}.memory."

        def opt(name, p=p):
            return w(p + name) if has(p + name) else None

        layers[i] = MemoryLayer(
            cfg, w(p + "query_proj.weight"), opt("query_proj.bias"), w(p + "keys"), stores[vname],
            value_proj=opt("value_proj.weight"), swilu_proj=w(p + "swilu_proj.weight") if cfg.swilu else None,
            value_bias=opt("value_proj.bias"), swilu_bias=opt("swilu_proj.bias") if cfg.swilu else None,
            gate_w=opt("gate.weight"), gate_b=opt("gate.bias"), layer=i)
    return layers, stores


def memory_param_bytes(m: MemoryLayer) -> int:
    ts = [m.query_w, m.query_b, m.keys, m.value_proj, m.swilu_proj, m.value_bias, m.swilu_bias, m.gate_w, m.gate_b]
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def memory_layers_info(model) -> dict | None:
    """What GetModelInfo reports about a model's memory layers (None for a dense model). A store may
    describe its shards with `shard_info() -> [{"name", "layout", "begin", "end", "replicas"}]`
    (remote stores, issue 17); local tables report none."""
    mc = model.config.memory_layers
    if mc is None:
        return None
    stores = model.value_stores()
    shards = []
    for name, s in stores.items():
        info = getattr(s, "shard_info", None)
        shards += [dict(d, table=name) for d in (info() if callable(info) else [])]
    dtypes = sorted({s.dtype for s in stores.values()})
    return {"layers": list(mc.layers), "mode": mc.mode, "slots": mc.num_slots, "n_keys": mc.n_keys,
            "heads": mc.heads, "knn": mc.knn, "k_dim": mc.k_dim, "v_dim": mc.v_dim,
            "shared_values": mc.shared_values, "swilu": mc.swilu,
            "table_bytes": sum(s.nbytes for s in stores.values()), "table_dtype": ",".join(dtypes),
            "tables": sorted(stores), "shards": shards}
