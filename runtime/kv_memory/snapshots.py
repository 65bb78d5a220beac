"""Snapshots of a KVLayerStore: `state_tensors` / `load_state`, bit-exact (the v2 layouts kept)."""

from __future__ import annotations

import torch

from .buffers import _Rows

_PARTS = ("data", "scale", "min", "exact", "exact_idx")  # QuantizedBlocks' tensors, in its field order
_STORE_FIELDS = tuple(f"{x}_{part}" for x in "kv" for part in _PARTS)


class SnapshotMixin:
    """Snapshot methods of KVLayerStore (state lives in store.py)."""

    def _row_fields(self):
        return [(n, getattr(self, n)) for n in ("wscore", "reprs", "block_pos", "sel_count", "cent_k", "cent_v")]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to restore this layer bit-exactly (the LRU cache is rebuilt on demand)."""
        out: dict[str, torch.Tensor] = {}
        if self.sticky is not None:
            out["sticky"] = self.sticky.contiguous()
        if self.dec_slots is not None:  # block per decode slot, one row per query head as v2 lists them
            rows = self.dec_slots if self.dec_slots.shape[0] == self.hq else \
                self.dec_slots.repeat_interleave(self.hq // self.hkv, dim=0)
            out["dec_idx"], out["dec_valid"] = rows.clamp(min=0), rows >= 0
            out["dec_age"] = torch.tensor([self.dec_age], dtype=torch.long)
        for name, r in (*self.store.items(), *self._row_fields()):
            if r.get() is not None and r.n:
                out[name] = r.get().contiguous()
        if self.wkeys.n:  # the snapshot keeps v2's layouts: two key tensors, values (W, Hkv, D)
            out["wk"], out["wkr"] = (x.contiguous() for x in self.wkeys.get())
            out["wv"] = self.wv.get().transpose(0, 1).contiguous()
        out["n_tokens"] = torch.tensor([self.n_tokens], dtype=torch.long)
        return out

    def load_state(self, st: dict[str, torch.Tensor]) -> None:
        self.sticky = st["sticky"].clone() if "sticky" in st else None
        self.dec = None
        self.dec_slots = None
        if "dec_idx" in st:  # block ids per slot (a v2 snapshot lists sorted picks: slot i = pick i)
            slots = torch.where(st["dec_valid"], st["dec_idx"], -1)
            self.hq = slots.shape[0]
            q_head = self.cfg.policy.granularity == "q_head"
            self.dec_slots = slots if q_head else slots.view(self.hkv, -1, slots.shape[1])[:, 0]
        self.dec_age = int(st["dec_age"][0]) if "dec_age" in st else 0
        # loaded rows get 1/4 spare capacity: a restored session goes on appending, and with an exact fit
        # its first packed block doubled (copied) every per-block buffer of every layer. Decoding 96
        # tokens after loading a 32k session: packing 3.5 -> 0.5 ms/token (engine, busy box)
        for name in _STORE_FIELDS:
            self.store[name] = _Rows()
            if name in st:
                self.store[name].append(st[name], spare=st[name].shape[0] // 4)
        for name, old in self._row_fields():
            r = _Rows(old.dim)
            if name in st:
                r.append(st[name], spare=st[name].shape[r.dim] // 4)
            setattr(self, name, r)
        self.wkeys, self.wv = _Rows(dim=-1), _Rows(dim=1)
        if "wk" in st:
            self.wkeys.append(torch.stack((st["wk"], st["wkr"])), spare=st["wk"].shape[-1] // 4)
            self.wv.append(st["wv"].transpose(0, 1), spare=st["wv"].shape[0] // 4)
        self.n_tokens = int(st["n_tokens"][0])
        self.cache_k = self.cache_v = self.cache_ids = self.cache_used = None
        self.sel_rows = None
