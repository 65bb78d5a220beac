"""Block representatives: what a block's relevance to a query is scored against."""

from __future__ import annotations

import torch


def block_representatives(kb: torch.Tensor, sc: torch.Tensor, mode: str, repr_topk: int,
                          outliers: int = 0) -> torch.Tensor:
    """(nf, Hkv, R, D) from keys kb (nf, Hkv, bs, D) and attention received sc (nf, Hkv, bs).

    "quest": per-channel min and max (R = 2); otherwise the repr_topk most-attended keys of the block,
    kept as R = repr_topk vectors or their mean ("mean", R = 1), then its `outliers` keys farthest from
    its mean key (R += outliers; a block scores as the max over all R)."""
    if mode == "quest":
        return torch.stack((kb.amin(2), kb.amax(2)), dim=2)
    top = sc.topk(repr_topk, dim=-1).indices  # (nf, Hkv, r)
    keys = kb.gather(2, top[..., None].expand(-1, -1, -1, kb.shape[-1]))  # (nf, Hkv, r, D)
    keys = keys.mean(2, keepdim=True) if mode == "mean" else keys
    return torch.cat((keys, outlier_keys(kb, outliers)), 2) if outliers else keys


def block_centroids(kb: torch.Tensor, vb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean key (Hkv, D, nf) column-major and mean value (Hkv, nf, D) of blocks kb / vb (nf, Hkv, bs, D):
    what an unselected block contributes under RetrievalPolicy(unselected="centroid")."""
    return kb.mean(2).permute(1, 2, 0), vb.mean(2).transpose(0, 1)


def outlier_keys(kb: torch.Tensor, n: int) -> torch.Tensor:
    """(nf, Hkv, n, D): per block and KV head the n keys of kb (nf, Hkv, bs, D) farthest from the block's
    mean key -- tokens unlike the rest of their block, whatever attention they received in the window."""
    dist = (kb - kb.mean(2, keepdim=True)).norm(dim=-1)  # (nf, Hkv, bs)
    top = dist.topk(n, dim=-1).indices
    return kb.gather(2, top[..., None].expand(-1, -1, -1, kb.shape[-1]))
