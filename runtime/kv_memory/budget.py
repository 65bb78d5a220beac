"""The replica-wide memory-tier byte budget: one account shared by every KVLayerStore of an engine
(all running sequences and all sessions).

`used` is resynchronized exactly at every engine step (`sync`) and kept current within a step by the
stores themselves: a store that packs blocks adds their bytes (`charge`) and, if the account is then
over its limit, relieves it before returning -- first by parking idle sessions (the manager's hook),
then by evicting least-often-selected blocks, its own layer first, then the same layer of the largest
other memories. So the tier never holds more than `limit` bytes after any pack, not only at step ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class TierBudget:
    __slots__ = ("limit", "used", "memories", "park", "evicted_blocks", "parked")

    def __init__(self, limit: int, memories: Callable[[], Iterable], park: Callable[[int], int] | None = None):
        assert limit > 0, "the memory-tier budget must be > 0 bytes"
        self.limit = limit
        self.used = 0
        self.memories = memories  # () -> every SequenceKVMemory the budget covers
        self.park = park  # (bytes over) -> bytes freed by parking idle sessions
        self.evicted_blocks = 0
        self.parked = 0

    def sync(self) -> int:
        self.used = sum(m.tier_bytes()["memory"] for m in _unique(self.memories()))
        return self.used

    def charge(self, store, nbytes: int) -> None:
        """`store` (a KVLayerStore) just added nbytes to the memory tier."""
        self.used += nbytes
        if self.used > self.limit:
            self.relieve(store)

    def relieve(self, store) -> None:
        if self.park is not None:
            freed = self.park(self.used - self.limit)
            if freed:
                self.parked += 1
                self.sync()
        if self.used <= self.limit:
            return
        others = sorted((m.layers[store.layer] for m in _unique(self.memories())
                         if store.layer < len(m.layers) and m.layers[store.layer] is not store),
                        key=lambda s: -s.memory_tier_bytes())
        for s in (store, *others):
            over = self.used - self.limit
            if over <= 0:
                break
            before = s.memory_tier_bytes()
            self.evicted_blocks += s.enforce_budget(max(0, before - over))
            self.used -= before - s.memory_tier_bytes()


def _unique(memories: Iterable) -> list:
    seen, out = set(), []
    for m in memories:
        if id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def tier_bytes_per_token(cfg, num_layers: int, num_kv_heads: int, head_dim: int, dtype) -> float:
    """Memory-tier bytes one packed token costs over all layers under cfg (measured by compressing one
    dummy block per distinct (key, value) kind, so it matches what the store holds exactly)."""
    import torch

    from .quant import quantize

    bs, per_kind = cfg.block_size, {}
    x = torch.zeros((1, num_kv_heads, bs, head_dim), dtype=dtype)
    total = 0
    for layer in range(num_layers):
        kinds = cfg.kinds(layer)
        if kinds not in per_kind:
            n = 0
            for kind, per_channel, group, ex in ((kinds[0], True, cfg.key_group, cfg.exact_keys),
                                                 (kinds[1], False, cfg.value_group, cfg.exact_values)):
                idx = torch.arange(ex).expand(1, num_kv_heads, ex)
                qb = quantize(x, kind, per_channel=per_channel, group=group, exact_idx=idx)
                n += sum(t.numel() * t.element_size() for t in (qb.data, qb.scale, qb.minimum, qb.exact,
                                                               qb.exact_idx) if t is not None)
            per_kind[kinds] = n
        total += per_kind[kinds]
    return total / bs
