"""Growable tensors (`_Rows`): the storage every part of the KV memory appends to, without per-step
concatenation. (The attention ops' scratch workspace is memserve.kernels._common.workspace.)"""

from __future__ import annotations

import torch


class _Rows:
    """A tensor that grows along one dim (0, 1, or the last for key columns) with capacity doubling
    (amortized O(1) appends). An optional `front` region before the rows holds other entries that one
    product should span together with the rows (the KV memory's decode blocks before its window)."""

    __slots__ = ("buf", "n", "dim", "front")

    def __init__(self, dim: int = 0):
        self.buf: torch.Tensor | None = None
        self.n = 0
        self.dim = dim
        self.front = 0

    def _shape(self, like: torch.Tensor, cap: int) -> tuple[int, ...]:
        shape = list(like.shape)
        shape[self.dim] = cap
        return tuple(shape)

    def append(self, rows: torch.Tensor, spare: int = 0) -> None:
        """Append rows; a first allocation leaves room for `spare` more."""
        dim, t, f = self.dim, rows.shape[self.dim], self.front
        if self.buf is None:
            self.buf = rows.new_zeros(self._shape(rows, f + max(4, t + spare)))
        need = f + self.n + t
        if need > self.buf.shape[dim]:
            grown = self.buf.new_empty(self._shape(self.buf, max(need, 2 * self.buf.shape[dim])))
            grown.narrow(dim, 0, f + self.n).copy_(self.buf.narrow(dim, 0, f + self.n))
            self.buf = grown
        self.buf.narrow(dim, f + self.n, t).copy_(rows)
        self.n += t

    def get(self) -> torch.Tensor | None:
        return None if self.buf is None else self.buf.narrow(self.dim, self.front, self.n)

    def with_front(self) -> torch.Tensor:
        return self.buf.narrow(self.dim, 0, self.front + self.n)

    def set_front(self, f: int) -> None:
        """Make the front region f entries long (zeroed), keeping the rows."""
        grown = self.buf.new_zeros(self._shape(self.buf, f + self.buf.shape[self.dim] - self.front))
        grown.narrow(self.dim, f, self.n).copy_(self.get())
        self.buf, self.front = grown, f

    def keep(self, idx: torch.Tensor) -> None:
        assert self.front == 0
        if self.buf is not None:
            kept = self.get().index_select(self.dim, idx)
            self.buf, self.n = None, 0
            if kept.shape[self.dim]:
                self.append(kept)

    def drop(self, start: int, n: int) -> None:
        """Remove entries [start, start + n), moving the tail down."""
        start += self.front
        tail = self.buf.narrow(self.dim, start + n, self.front + self.n - start - n).clone()
        self.buf.narrow(self.dim, start, tail.shape[self.dim]).copy_(tail)
        self.n -= n

    def nbytes(self, front: bool = False) -> int:
        """Bytes of the rows (and of the front region if asked)."""
        n = self.n + (self.front if front else 0)
        return 0 if self.buf is None else n * (self.buf.numel() // self.buf.shape[self.dim]) * self.buf.element_size()

