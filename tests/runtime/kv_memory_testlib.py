"""Shared pieces of the KV-memory unit tests: random q/k/v of the tests' small shapes, and one sequence's
chunked attention through a `KVLayerStore` (chunk sizes cycle to the last one given)."""

import torch

HQ, HKV, D = 6, 2, 16


def random_qkv(t: int, seed: int = 0, dtype=torch.float64):
    """q (t, HQ, D), k and v (t, HKV, D), normal, from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t, h, D, generator=g, dtype=dtype) for h in (HQ, HKV, HKV))


def attend_in_chunks(mem, q, k, v, chunks, inv, scale, p: int = 0) -> list[torch.Tensor]:
    """mem.attend over q/k/v from position p in chunks of the sizes `chunks` (the last size repeats)."""
    outs, sizes = [], list(chunks)
    while p < q.shape[0]:
        n = min(sizes[0], q.shape[0] - p)
        if len(sizes) > 1:
            sizes.pop(0)
        outs.append(mem.attend(q[p : p + n], k[p : p + n], v[p : p + n], p, inv, scale))
        p += n
    return outs
