"""Paged KV cache: a pool of fixed-size blocks shared by all sequences.

Two halves, kept apart on purpose:

* `BlockAllocator` (scheduler/block_allocator.py, re-exported here) — pure CPU bookkeeping (free list,
  one block table per sequence). The scheduler owns one and decides from it which requests fit; it
  never touches tensors, so the batching policy is tested without a model.
* `KVCache` — the tensors. Per layer `k_cache[layer]`, `v_cache[layer]` of shape
  (num_blocks, block_size, num_kv_heads, head_dim), the layout every kernel in `memserve.kernels`
  reads. Token `i` of a sequence lives at slot `block_table[i // block_size] * block_size + i % block_size`
  of the flattened (num_blocks * block_size, num_kv_heads, head_dim) view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from memserve.scheduler.block_allocator import BlockAllocator, cdiv  # noqa: F401  (re-exported)


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
    """Bytes one block costs across all layers (keys and values)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


def num_blocks_for_budget(budget_bytes: int, num_layers: int, block_size: int, num_kv_heads: int,
                          head_dim: int, dtype: torch.dtype) -> int:
    per_block = kv_bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)
    n = budget_bytes // per_block
    if n < 1:
        raise ValueError(
            f"kv_cache_bytes={budget_bytes} is smaller than one KV block ({per_block} bytes for "
            f"block_size={block_size}); raise kv_cache_bytes or lower block_size")
    return int(n)


@dataclass(slots=True)
class KVCacheSpec:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def __post_init__(self):
        assert self.num_layers > 0 and self.num_blocks > 0 and self.block_size > 0
        assert self.num_kv_heads > 0 and self.head_dim > 0

    @property
    def nbytes(self) -> int:
        return self.num_blocks * kv_bytes_per_block(self.num_layers, self.block_size, self.num_kv_heads,
                                                    self.head_dim, self.dtype)


class KVCache:
    """The KV tensors: one allocation (2, L, NB, BS, Hkv, D), per-layer views."""

    def __init__(self, spec: KVCacheSpec):
        self.spec = spec
        # (2, L, NB, BS, Hkv, D); zero-filled so unused slots never hold NaN garbage that a
        # masked-out kernel lane could still multiply by 0 (0 * NaN = NaN).
        self.storage = torch.zeros(2, spec.num_layers, spec.num_blocks, spec.block_size, spec.num_kv_heads,
                                   spec.head_dim, dtype=spec.dtype, device=spec.device)
        self.k_cache = [self.storage[0, i] for i in range(spec.num_layers)]  # each (NB, BS, Hkv, D)
        self.v_cache = [self.storage[1, i] for i in range(spec.num_layers)]

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()
