"""The KV memory's store: `KVLayerStore` (one sequence, one layer) -- sinks + window buffer on the device
tier, packed blocks compressed in the memory tier, block representatives, eviction under a byte budget --
and `SequenceKVMemory` (one KVLayerStore per layer of a sequence or session)."""

from __future__ import annotations

import torch

from .attention import AttentionMixin
from .buffers import _Rows
from .config import KVMemoryConfig
from .positions import _PlanCache
from .quant import QuantizedBlocks, dequantize, dequantize_block_heads, quantize
from .representatives import block_centroids, block_representatives
from .selection import blocks_to_evict
from .snapshots import _PARTS, _STORE_FIELDS, SnapshotMixin
from .working_set import WorkingSetMixin


class KVLayerStore(AttentionMixin, WorkingSetMixin, SnapshotMixin):
    """KV memory of one sequence in one layer: its store (sinks, window buffer, compressed blocks and
    their representatives) and, through the mixins, its attention (attention.py), decode working set and
    LRU cache (working_set.py) and snapshots (snapshots.py). `attend` runs a chunk's attention and
    appends its KV."""

    token_path = True  # single decode tokens take `_attend_token` (False: the chunk path; tests compare them)

    def __init__(self, cfg: KVMemoryConfig, layer: int, num_kv_heads: int, head_dim: int, num_layers: int = 1,
                 plans: _PlanCache | None = None):
        self.cfg, self.layer, self.hkv, self.d = cfg, layer, num_kv_heads, head_dim
        self.plans = plans if plans is not None else _PlanCache()  # shared by a sequence's layers
        self.num_layers = num_layers  # the session budget is split evenly over the layers
        self.n_tokens = 0  # tokens appended so far (= position of the next token)
        self.hq = num_kv_heads  # query heads, known from the first chunk
        # working set rows = [sinks (n_s) | buffer (n_b)], grown in place (no per-step concatenation).
        # Keys (2, Hkv, D, W): [0] without RoPE (far columns; packed into blocks), [1] rotated at their
        # absolute positions (local attention) -- one buffer, so a decode step appends both with one copy.
        # Column-major: logits are then a plain q @ K bmm. A (3x64) @ (64x640) decode product measured
        # 3-5x faster than against a transposed (W, Hkv, D) view on this CPU
        self.wkeys = _Rows(dim=-1)
        self.wv = _Rows(dim=1)  # (Hkv, W, D) values
        self.wscore = _Rows()  # (W, Hkv) attention each token received while in the buffer
        self._zero_score: torch.Tensor | None = None  # a decode step's wscore row
        self.store = {f: _Rows() for f in _STORE_FIELDS}  # memory tier, rows = blocks (quant.py)
        self.reprs = _Rows(dim=2)  # (Hkv, D, NB, R) column-major: scoring is one bmm, no permuting copy
        self.block_pos = _Rows()  # (NB,) first position of each block
        # unselected="centroid": per block and KV head its mean key (Hkv, D, NB) and mean value (Hkv, NB, D)
        self.cent_k, self.cent_v = _Rows(dim=2), _Rows(dim=1)
        self.sel_rows: torch.Tensor | None = None  # (Hkv or Hq, NB) bool: the blocks the last selection picked
        self.sel_count = _Rows()  # (NB,) how often each block was selected (eviction by importance)
        self.sticky: torch.Tensor | None = None  # (Hq, NB) bool: last prefill chunk's selection
        # decode working set: the picked blocks in slots of `block_size` columns, one row of slots per
        # selection unit; dec_slots (rows, S) holds each slot's block id (-1: empty). For KV-head / shared
        # selection the slots are the front regions of self.wkeys[0] and self.wv (one product spans blocks
        # and window: 3 bmm per decode step instead of 5, 279 -> 238 us per layer at 32k), and self.dec is
        # (None, None, padding); for "q_head" it is the (k, v, padding) gathered through the LRU cache
        self.dec = None
        self.dec_slots: torch.Tensor | None = None
        self.dec_age = 0  # decode steps that used self.dec
        self.cache_k = self.cache_v = None  # (Hkv, C, bs, D) LRU of dequantized blocks
        self.cache_ids: torch.Tensor | None = None  # (C,) block id per slot, -1 empty
        self.cache_used: torch.Tensor | None = None  # (C,) tick of last use
        self.tick = 0
        self.retrieved_total = 0  # blocks moved memory tier -> device (prefill: whole blocks; decode: one KV head each)
        self.selected_total = 0  # block selections (summed over heads and steps)
        self.evicted_total = 0
        self.record_scores = False
        # RetrievalPolicy.exact: position just past the prompt (the chunk that holds it is scored exactly),
        # None: unknown (no prefill chunk is); decode steps since the last exact scoring
        self.prompt_end: int | None = None
        self.exact_age = 0
        self.tier = None  # TierBudget shared by the engine's memories (budget.py), None = no replica cap
        self.last_scores: torch.Tensor | None = None

    # ------------------------------------------------------------------ sizes
    @property
    def num_blocks(self) -> int:
        return self.block_pos.n

    @property
    def n_sinks(self) -> int:
        return min(self.n_tokens, self.cfg.n_init)

    @property
    def buf_start(self) -> int:
        return self.n_tokens - (self.wkeys.n - self.n_sinks)

    def memory_tier_bytes(self) -> int:
        return sum(r.nbytes() for r in self.store.values())

    def device_tier_bytes(self) -> int:
        n = self.reprs.nbytes() + self.wkeys.nbytes(front=True) + self.wv.nbytes(front=True)
        if self.cache_k is not None:
            used = int((self.cache_ids >= 0).sum())
            n += used * sum(c[:, 0].numel() * c.element_size() for c in (self.cache_k, self.cache_v))
        if self.dec is not None and self.dec[0] is not None:
            n += sum(x.numel() * x.element_size() for x in self.dec[:2])
        return n

    def bytes_per_block(self) -> int:
        return self.memory_tier_bytes() // max(1, self.num_blocks)

    def _stored(self) -> tuple[QuantizedBlocks, QuantizedBlocks]:
        """The memory tier's keys and values (views of the store)."""
        return tuple(QuantizedBlocks(kind, *(self.store[f"{x}_{part}"].get() for part in _PARTS))
                     for x, kind in zip("kv", self.cfg.kinds(self.layer)))

    def _load_block_heads(self, blocks: torch.Tensor, heads: torch.Tensor):
        """(n, bs, D) keys and values of block blocks[i] in KV head heads[i], from the memory tier."""
        (kq, vq), cfg = self._stored(), self.cfg
        return (dequantize_block_heads(kq, blocks, heads, per_channel=True, group=cfg.key_group),
                dequantize_block_heads(vq, blocks, heads, per_channel=False, group=cfg.value_group))

    def _load_blocks(self, idx: torch.Tensor):
        (kq, vq), cfg = self._stored(), self.cfg
        return (dequantize(kq, idx, per_channel=True, group=cfg.key_group),
                dequantize(vq, idx, per_channel=False, group=cfg.value_group))

    # ------------------------------------------------------------------ state updates
    def _pack(self, nf: int) -> None:
        """Move the nf oldest full blocks of the buffer into the memory tier."""
        cfg, bs, hkv, d = self.cfg, self.cfg.block_size, self.hkv, self.d
        n, n_s = nf * bs, self.n_sinks
        start = self.buf_start
        before = self.memory_tier_bytes() if self.tier is not None else 0
        kb = self.wkeys.get()[0, :, :, n_s : n_s + n].reshape(hkv, d, nf, bs).permute(2, 0, 3, 1)  # (nf, Hkv, bs, D)
        vb = self.wv.get()[:, n_s : n_s + n].reshape(hkv, nf, bs, d).transpose(0, 1)  # (nf, Hkv, bs, D)
        sc = self.wscore.get()[n_s : n_s + n].reshape(nf, bs, hkv).transpose(1, 2)  # (nf, Hkv, bs)
        self.reprs.append(self._representatives(kb, sc).permute(1, 3, 0, 2))
        if cfg.policy.unselected == "centroid" and self.cent_k.n == self.num_blocks:
            ck_, cv_ = block_centroids(kb, vb)  # from the full-precision keys, before compression
            self.cent_k.append(ck_)
            self.cent_v.append(cv_)
        ck, cv = cfg.kinds(self.layer)
        top = sc.topk(max(cfg.exact_keys, cfg.exact_values), dim=-1).indices  # most-attended tokens first
        kq = quantize(kb, ck, per_channel=True, group=cfg.key_group, exact_idx=top[..., : cfg.exact_keys])
        vq = quantize(vb, cv, per_channel=False, group=cfg.value_group, exact_idx=top[..., : cfg.exact_values])
        for x, qb in (("k", kq), ("v", vq)):
            for part, t in zip(_PARTS, (qb.data, qb.scale, qb.minimum, qb.exact, qb.exact_idx)):
                if t is not None:
                    self.store[f"{x}_{part}"].append(t)
        dev = kb.device
        self.block_pos.append(start + bs * torch.arange(nf, device=dev))
        self.sel_count.append(torch.zeros(nf, dtype=torch.long, device=dev))
        for r in (self.wkeys, self.wv, self.wscore):
            r.drop(n_s, n)
        self.dec_age = self.cfg.policy.reselect_every  # those tokens left the window: select afresh next step
        if cfg.budget_bytes is not None:
            self.enforce_budget(cfg.budget_bytes // self.num_layers)
        if self.tier is not None:  # the replica-wide budget (budget.py): may park sessions / evict
            self.tier.charge(self, self.memory_tier_bytes() - before)

    def _representatives(self, kb: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        """(nf, Hkv, R, D) from keys kb (nf, Hkv, bs, D) and attention received sc (nf, Hkv, bs)."""
        return block_representatives(kb, sc, self.cfg.policy.repr_mode, self.cfg.repr_topk, self.cfg.repr_outliers)

    def enforce_budget(self, budget: int) -> int:
        """Drop least-often-selected blocks until the memory tier fits `budget` bytes; returns #dropped."""
        nb = self.num_blocks
        if nb == 0:
            return 0
        drop = blocks_to_evict(self.sel_count.get(), self.bytes_per_block(), self.memory_tier_bytes(), budget)
        if drop.numel() == 0:
            return 0
        keep = torch.ones(nb, dtype=torch.bool, device=drop.device)
        keep[drop] = False
        keep_idx = keep.nonzero().squeeze(1)
        for r in (*self.store.values(), self.reprs, self.block_pos, self.sel_count):
            r.keep(keep_idx)
        for r in (self.cent_k, self.cent_v):
            if r.n == nb:
                r.keep(keep_idx)
        self.sel_rows = None
        if self.sticky is not None:
            self.sticky = self.sticky[:, keep_idx[keep_idx < self.sticky.shape[1]]]
        self.cache_k = self.cache_v = self.cache_ids = self.cache_used = None  # ids changed: refill
        self.dec = self.dec_slots = None  # and select again
        self.evicted_total += int(drop.numel())
        return int(drop.numel())


class SequenceKVMemory:
    """The KV memory of one sequence (or session): one KVLayerStore per layer plus its token ids."""

    def __init__(self, cfg: KVMemoryConfig, num_layers: int, num_kv_heads: int, head_dim: int):
        self.cfg = cfg
        plans = _PlanCache()
        self.layers = [KVLayerStore(cfg, i, num_kv_heads, head_dim, num_layers, plans) for i in range(num_layers)]
        self.token_ids: list[int] = []

    @property
    def num_tokens(self) -> int:
        return self.layers[0].n_tokens

    def set_prompt_end(self, n: int | None) -> None:
        """Tell every layer where the current prompt ends (RetrievalPolicy.exact="query" scores the chunk
        holding that position exactly)."""
        for m in self.layers:
            m.prompt_end = n

    def tier_bytes(self) -> dict[str, int]:
        return {"device": sum(m.device_tier_bytes() for m in self.layers),
                "memory": sum(m.memory_tier_bytes() for m in self.layers)}

    def attach_tier(self, tier) -> None:
        """Count this memory against a replica-wide TierBudget (None: detach)."""
        for m in self.layers:
            m.tier = tier

    def blocks_retrieved(self) -> int:
        return sum(m.retrieved_total for m in self.layers)
