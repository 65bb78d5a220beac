"""Block allocators: pure CPU bookkeeping of the paged KV pool (free list, one block table per sequence).

The scheduler owns one and decides from it which requests fit; it never touches tensors (no torch
here), so the batching policy is tested without a model. The tensors live in runtime/kv_cache.py.
"""

from __future__ import annotations

from collections.abc import Callable


def cdiv(a: int, b: int) -> int:
    return -(-a // b)



class BlockAllocator:
    """Free list + per-sequence block tables (pure Python, no tensors).

    Blocks are handed out LIFO (recently freed blocks are warm in cache). A sequence's table grows
    with `allocate(seq_id, num_tokens)`, which makes room for `num_tokens` tokens in total.
    """

    __slots__ = ("num_blocks", "block_size", "block_bytes", "_free", "tables")

    def __init__(self, num_blocks: int, block_size: int, block_bytes: int = 1):
        assert num_blocks > 0 and block_size > 0 and block_bytes > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        # bytes one pool block holds over every layer, keys and values (the engine's KV cache spec): the
        # scheduler's preemption counts the bytes a victim frees against the bytes a sequence is short
        self.block_bytes = block_bytes
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """Extra blocks `seq_id` needs to hold `num_tokens` tokens in total."""
        have = len(self.tables.get(seq_id, ()))
        return max(0, cdiv(num_tokens, self.block_size) - have)

    def can_allocate(self, seq_id: str, num_tokens: int) -> bool:
        return self.blocks_needed(seq_id, num_tokens) <= len(self._free)

    def bytes_short(self, seq_id: str, num_tokens: int) -> int:
        """Paged-pool bytes missing for `seq_id` to hold `num_tokens` tokens (0: it fits)."""
        return max(0, self.blocks_needed(seq_id, num_tokens) - len(self._free)) * self.block_bytes

    def paged_bytes_of(self, seq_id: str) -> int:
        """Paged-pool bytes `seq_id` holds (what preempting it frees in the pool)."""
        return self.num_blocks_of(seq_id) * self.block_bytes

    def allocate(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grow `seq_id`'s table to hold `num_tokens` tokens; returns the whole table."""
        need = self.blocks_needed(seq_id, num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {need}, free {len(self._free)}")
        table = self.tables.setdefault(seq_id, [])
        for _ in range(need):
            table.append(self._free.pop())
        return table

    def free(self, seq_id: str) -> int:
        """Return all of `seq_id`'s blocks to the pool (no-op if it has none)."""
        table = self.tables.pop(seq_id, None)
        if not table:
            return 0
        self._free.extend(reversed(table))
        return len(table)

    def num_blocks_of(self, seq_id: str) -> int:
        return len(self.tables.get(seq_id, ()))


class MemoryAwareAllocator(BlockAllocator):
    """Paged-block allocator in which memory sequences take no pool blocks.

    Block 0 is reserved as a scratch block: a memory sequence's "table" points every position at it,
    so AttentionMetadata can compute (unused) slots without special cases.
    """

    __slots__ = ("memory_seqs", "memory_room")

    def __init__(self, num_blocks: int, block_size: int, block_bytes: int = 1):
        assert num_blocks >= 2, "the KV pool needs >= 2 blocks (one is the memory sequences' scratch block)"
        super().__init__(num_blocks, block_size, block_bytes)
        self._free.remove(0)
        self.memory_seqs: set[str] = set()
        # (seq_id, num_tokens) -> whether the memory tier has room for the sequence to hold num_tokens
        # (the KV-memory manager's replica-wide tier budget); None: no tier budget
        self.memory_room: Callable[[str, int], bool] | None = None

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / (self.num_blocks - 1)

    def can_allocate(self, seq_id: str, num_tokens: int) -> bool:
        if seq_id in self.memory_seqs:  # no pool blocks; the memory tier's budget decides
            return self.memory_room is None or self.memory_room(seq_id, num_tokens)
        return super().can_allocate(seq_id, num_tokens)

    def allocate(self, seq_id: str, num_tokens: int) -> list[int]:
        if seq_id not in self.memory_seqs:
            return super().allocate(seq_id, num_tokens)
        table = self.tables.setdefault(seq_id, [])
        table.extend([0] * max(0, -(-num_tokens // self.block_size) - len(table)))
        return table

    def bytes_short(self, seq_id: str, num_tokens: int) -> int:
        # a memory sequence takes no pool bytes; when the tier refuses, preempting pool holders frees nothing
        # it can use, so it reports no shortage here and `can_allocate` keeps it waiting
        return 0 if seq_id in self.memory_seqs else super().bytes_short(seq_id, num_tokens)

    def num_blocks_of(self, seq_id: str) -> int:
        return 0 if seq_id in self.memory_seqs else super().num_blocks_of(seq_id)

    def free(self, seq_id: str) -> int:
        if seq_id in self.memory_seqs:
            self.tables.pop(seq_id, None)
            return 0
        return super().free(seq_id)
