"""The KV memory's working set: which blocks a step attends (scores through memserve.kernels, selection through selection.py),
decode's slots of picked blocks in front of the window, and the LRU device cache of dequantized blocks."""

from __future__ import annotations

import math

import torch
from memserve.kernels import score_block_reprs

from .buffers import _Rows
from .positions import ordered_slot_positions, rotate_columns
from .quant import dequantize_block_heads, exact_block_scores
from .representatives import block_centroids
from .selection import rerank_candidates, select_blocks


class WorkingSetMixin:
    """Working-set methods of KVLayerStore (state lives in store.py)."""

    def _retrieve(self, q_glob: torch.Tensor, repr_scores: torch.Tensor | None = None):
        """Blocks this chunk attends to: keys (Hkv, 1 or G, D, M) column-major, values (Hkv, 1 or G, M, D),
        and an (Hkv, 1 or G, 1, M) additive 0 / -inf over padding (None if every head has M picks).

        A prefill chunk selects with its mean query (and, sticky, remembers the pick) and gathers its
        picks through the LRU device cache; a decode step selects top-k for its query (union the sticky
        pick) every `reselect_every` steps into the decode working set and reuses it in between.
        repr_scores: this step's (Hq, NB) representative scores when computed in a batch over the step's
        sequences (`attention.batched_repr_scores`; only when `_repr_scoring_due`)."""
        pol = self.cfg.policy
        t, hq, d = q_glob.shape
        self.exact_age += t == 1
        if t == 1 and self.dec_slots is not None and self.dec_age < pol.reselect_every:
            if self.dec is None:  # restored from a snapshot: refill the same slots
                self._refill(None)
            self.dec_age += 1
            return self._decode_blocks()
        nb = self.num_blocks
        scores, exact = self._block_scores(q_glob, repr_scores)  # (Hq, NB)
        k = pol.exact_topk_for(self.layer, nb) if exact else pol.topk_for(self.layer, nb)
        if self.record_scores:  # probes (bench/kv_memory_probe.py) read the last step's block scores
            self.last_scores = scores
        extra = None
        if pol.sticky and t == 1 and self.sticky is not None:
            extra = torch.zeros(hq, nb, dtype=torch.bool, device=q_glob.device)
            extra[:, : self.sticky.shape[1]] = self.sticky
        idx, valid, mask = select_blocks(scores, k, pol.granularity, self.hkv, extra, pol.next_blocks,
                                         pol.exact_reduce if exact else "sum")
        if t > 1 and pol.sticky:
            self.sticky = mask
        self.sel_rows = mask if pol.granularity == "q_head" else mask.view(self.hkv, -1, nb)[:, 0]
        counts = mask.sum(0)
        self.sel_count.buf[:nb].add_(counts)
        self.selected_total += int(counts.sum())
        if t > 1:
            self.dec = self.dec_slots = None
            kk, vv, pad = self._gather(idx, valid)
            if self._ordered(t):  # RetrievalPolicy.positions: the picks at their ordered positions
                rows = idx.view(self.hkv, -1, idx.shape[1])[:, 0], valid.view(self.hkv, -1, idx.shape[1])[:, 0]
                pos = ordered_slot_positions(*rows, self.n_sinks, self.cfg.block_size)
                kk = rotate_columns(kk[:, 0], pos, self._inv_freq.to(kk.device))[:, None]
            return kk, vv, pad
        if pol.granularity == "q_head":
            self.dec_slots = torch.where(valid, idx, -1)
        self._refill(mask)
        self.dec_age = 1
        return self._decode_blocks()

    def _repr_scoring_due(self, t: int) -> bool:
        """Whether the next `_retrieve` of t queries scores the blocks by their representatives (not a reused
        decode selection, not an exact scoring, some blocks to attend): what a batch precomputes."""
        pol = self.cfg.policy
        if not self._uses_blocks() or (t == 1 and self.dec_slots is not None and self.dec_age < pol.reselect_every):
            return False
        return not self._exact_due(t, self.exact_age + (t == 1))  # _retrieve counts this step first

    def _block_scores(self, q_glob: torch.Tensor, repr_scores: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """(Hq, NB) scores of this selection and whether they are exact: exact over every stored key where
        RetrievalPolicy.exact asks for it (`_exact_due`), else the representatives (`repr_scores` when a
        batch computed them) + optional re-ranking."""
        pol, q = self.cfg.policy, q_glob.mean(0)
        if repr_scores is None and self._exact_due(q_glob.shape[0]):
            # after the question's chunk the first decode selection is due too (its single query, not the
            # chunk's mean, finds the needle: tuned 16k cells 1/6 -> 4/6, bench/results/kv_memory_retrieval_16k.md)
            t = q_glob.shape[0]
            if self._holds_prompt_end(t):
                self.exact_age = pol.exact_every
                if pol.exact_query_tokens:  # the question's own queries: the last N up to the prompt's end
                    e = self.prompt_end - self.n_tokens
                    q = q_glob[max(0, e - pol.exact_query_tokens) : e].mean(0)
            else:
                self.exact_age = 0
            return exact_block_scores(self._stored()[0], q, self.cfg.key_group).to(q.dtype), True
        scores = repr_scores
        if scores is None:
            scores = score_block_reprs(q[None], [self.reprs.get().to(q.dtype)], pol.repr_mode)[0]
        if pol.rerank:
            scores = self._rerank(q, scores, max(pol.rerank, pol.topk_for(self.layer, self.num_blocks)))
        return scores, False

    def _exact_due(self, t: int, age: int | None = None) -> bool:
        """exact="query": the chunk holding the prompt's last token (self.prompt_end, set by the backend),
        then (exact_every > 0) the first decode selection after it and any decode selection once exact_every
        decode steps passed since the last exact scoring (age: that count, default self.exact_age)."""
        pol = self.cfg.policy
        if pol.exact != "query":
            return False
        if self._holds_prompt_end(t):
            return True
        return t == 1 and pol.exact_every > 0 and (self.exact_age if age is None else age) >= pol.exact_every

    def _holds_prompt_end(self, t: int) -> bool:
        """This step's t tokens include the prompt's last one."""
        return self.prompt_end is not None and self.n_tokens < self.prompt_end <= self.n_tokens + t

    def _rerank(self, q: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
        """Scores (Hq, NB) of the second stage: for each KV head's candidates (the best n by representative),
        every query head of its group scores the block by the exact max q.k over the block's stored keys
        (dequantized for those (block, head) pairs only); other blocks get -inf. q (Hq, D)."""
        hkv, nb = self.hkv, self.num_blocks
        g = q.shape[0] // hkv
        cand = rerank_candidates(scores, n, self.cfg.policy.granularity, hkv)  # (Hkv, NB)
        heads, blocks = cand.nonzero(as_tuple=True)
        kb = dequantize_block_heads(self._stored()[0], blocks, heads, per_channel=True,
                                    group=self.cfg.key_group)  # (n, bs, D) keys only
        qg = q.view(hkv, g, -1)[heads].to(kb.dtype)  # (n, G, D)
        exact = torch.bmm(qg, kb.transpose(1, 2)).amax(-1)  # (n, G)
        out = torch.full((hkv, g, nb), float("-inf"), dtype=scores.dtype, device=scores.device)
        out[heads, :, blocks] = exact.to(scores.dtype)
        return out.view(hkv * g, nb)

    def _selected_rows(self) -> torch.Tensor | None:
        """(Hkv or Hq, NB) bool: the blocks this step attends exactly (None: none, top-k 0)."""
        nb = self.num_blocks
        if not self._uses_blocks():
            return None
        if self.sel_rows is not None and self.sel_rows.shape[1] == nb:
            return self.sel_rows
        slots = self.dec_slots  # restored from a snapshot mid-decode: the slots are the selection
        sel = torch.zeros((slots.shape[0], nb + 1), dtype=torch.bool, device=slots.device)
        sel.scatter_(1, torch.where(slots >= 0, slots, nb), True)
        self.sel_rows = sel[:, :nb]
        return self.sel_rows

    def _unselected_part(self, dtype: torch.dtype):
        """RetrievalPolicy(unselected="centroid"): every block's mean key (Hkv, D, NB) and mean value
        (Hkv, NB, D), and an additive (Hkv, 1 or G, 1, NB) logit term: log(block_size) where this step did
        not select the block (exp(q.mean_k) * block_size stands for the sum of its block_size terms), -inf
        where it did (its exact keys are attended). Call after `_retrieve`."""
        nb, hkv = self.num_blocks, self.hkv
        if self.cent_k.n != nb:  # a snapshot without centroids (or the option turned on later): from the tier
            kb, vb = self._load_blocks(torch.arange(nb, device=self.wv.buf.device))
            ck, cv = block_centroids(kb.to(self.wv.buf.dtype), vb.to(self.wv.buf.dtype))
            self.cent_k, self.cent_v = _Rows(dim=2), _Rows(dim=1)
            self.cent_k.append(ck, spare=nb // 4)
            self.cent_v.append(cv, spare=nb // 4)
        sel = self._selected_rows()
        dev = self.wv.buf.device
        bias = torch.full((hkv, 1, 1, nb), math.log(self.cfg.block_size), dtype=dtype, device=dev)
        if sel is not None:
            bias = bias.expand(hkv, sel.shape[0] // hkv, 1, nb).masked_fill(
                sel.view(hkv, -1, 1, nb), float("-inf"))
        return self.cent_k.get(), self.cent_v.get(), bias

    def _decode_blocks(self):
        """The decode working set as `_retrieve` returns blocks (views of the front regions)."""
        if self.dec[0] is not None:  # "q_head": gathered
            return self.dec
        m = self.wkeys.front
        return self.wkeys.buf[0, :, :, :m][:, None], self.wv.buf[:, :m][:, None], self.dec[2]

    def _refill(self, mask: torch.Tensor | None) -> None:
        """Bring the decode working set to the picks `mask` (Hq, NB) bool: slots whose block is still
        picked are kept, new picks are dequantized -- for the heads that picked them only -- into free
        slots. Attention does not depend on slot order, so a fresh selection that changes a few picks
        costs a few blocks, not all of them (at 32k: ~14 of ~35 block-heads per refresh). mask None:
        rebuild the slots listed in self.dec_slots (after a snapshot load)."""
        hkv, d, bs, nb = self.hkv, self.d, self.cfg.block_size, self.num_blocks
        dev = self.wv.buf.device
        ordered = self._ordered(1)
        if self.cfg.policy.granularity == "q_head":  # per query head (dec_slots set): through the LRU cache
            self.dec = self._gather(self.dec_slots.clamp(min=0), self.dec_slots >= 0)
            return
        if mask is None:  # restored: every listed slot is new
            slots = self.dec_slots
            rows, n_slots = slots.shape
            keep = torch.zeros(slots.shape, dtype=torch.bool, device=dev)
            ok, add_b = slots >= 0, slots
            add_s = torch.arange(n_slots, device=dev).expand_as(slots)
            rebuild = True
        else:
            want = mask.view(hkv, -1, nb)[:, 0]  # (Hkv, NB): the rows of a GQA group are equal
            rows = hkv
            slots = self.dec_slots
            if slots is None or self.dec is None:
                slots = torch.full((rows, 0), -1, dtype=torch.long, device=dev)
            keep = (slots >= 0) & want.gather(1, slots.clamp(min=0))  # (rows, S): block still picked
            have = torch.zeros((rows, nb + 1), dtype=torch.bool, device=dev)
            have.scatter_(1, torch.where(keep, slots, nb), True)
            add = want & ~have[:, :nb]  # (rows, NB) picks not in the working set yet
            n_add = add.sum(1)
            need = int((keep.sum(1) + n_add).max())
            rebuild = need > slots.shape[1] or 4 * need <= 3 * slots.shape[1]  # grow, or compact idle slots
            # "ordered" positions depend on every pick's rank: the slots are rebuilt from the tier and rotated
            rebuild = rebuild or ordered
            if rebuild:
                keep = torch.zeros((rows, need), dtype=torch.bool, device=dev)
                add, n_add = want, want.sum(1)
                slots = torch.full((rows, need), -1, dtype=torch.long, device=dev)
            n_slots, a = slots.shape[1], int(n_add.max())
            sp, bp = torch.arange(n_slots, device=dev), torch.arange(nb, device=dev)
            # the j-th new pick of a row goes into the row's j-th free slot
            add_s = torch.where(keep, sp + n_slots, sp).topk(a, dim=1, largest=False).indices  # (rows, a)
            add_b = torch.where(add, bp, bp + nb).topk(a, dim=1, largest=False).indices
            ok = torch.arange(a, device=dev)[None] < n_add[:, None]
        if rebuild:  # the window moves behind a front region of the new size
            self.wkeys.set_front(n_slots * bs)
            self.wv.set_front(n_slots * bs)
        k4 = self.wkeys.buf[0, :, :, : n_slots * bs].view(hkv, d, n_slots, bs)
        v4 = self.wv.buf[:, : n_slots * bs].view(hkv, n_slots, bs, d)
        r = torch.arange(rows, device=dev)[:, None].expand_as(ok)[ok]
        s_, b = add_s[ok], add_b[ok]
        if b.numel():
            kb, vb = self._load_block_heads(b, r)  # (n, bs, D) each
            k4[r, :, s_] = kb.transpose(1, 2).to(k4.dtype)
            v4[r, s_] = vb.to(v4.dtype)
            self.retrieved_total += b.numel()
        slots = torch.where(keep, slots, -1)
        slots[r, s_] = b
        self.dec_slots = slots
        if ordered:  # every slot was just loaded unrotated (rebuild): rotate them at their ordered positions
            flat = k4.view(hkv, d, n_slots * bs)
            flat.copy_(rotate_columns(flat, ordered_slot_positions(slots, slots >= 0, self.n_sinks, bs),
                                      self._inv_freq.to(dev)))
        free = slots < 0
        pad = None
        if bool(free.any()):
            pad = torch.zeros((rows, n_slots, bs), dtype=v4.dtype, device=dev).masked_fill_(free[..., None], float("-inf"))
            pad = pad.view(hkv, 1, 1, n_slots * bs)
        self.dec = (None, None, pad)

    def _gather(self, idx: torch.Tensor, valid: torch.Tensor):
        """(k, v, padding) of picks idx/valid (Hq, K), through the LRU device cache."""
        hq = idx.shape[0]
        slots = self._cache_fetch(torch.unique(idx[valid]))  # (NB,) slot per block id (-1 if absent)
        g = hq // self.hkv
        if self.cfg.policy.granularity != "q_head":  # rows of a GQA group are identical: gather once per KV head
            idx, valid, g = idx.view(self.hkv, g, -1)[:, 0], valid.view(self.hkv, g, -1)[:, 0], 1
        bs, d, rows, k = self.cfg.block_size, self.d, idx.shape[0], idx.shape[1]
        kvh = torch.arange(rows, device=idx.device) // g
        c = self.cache_k.shape[1]
        flat = (kvh[:, None] * c + torch.where(valid, slots[idx], 0)).view(-1)  # (rows * K,) cache rows
        # whole-block copies; keys then go column-major (Hkv, g, D, K * bs) like the window's, moving
        # bs-long runs. Measured at 32k (engine, 30 layers): 2.2-2.6 ms/token in gathers against 3.6 for
        # 2-D advanced indexing of row-major blocks + a transposing copy; a column-major cache gathered
        # per column was 4-15x slower still (one thread, 16 blocks)
        kk = self.cache_k.view(-1, d, bs).index_select(0, flat).view(self.hkv, g, k, d, bs)
        kk = kk.transpose(2, 3).reshape(self.hkv, g, d, k * bs)
        vv = self.cache_v.view(-1, bs, d).index_select(0, flat).view(self.hkv, g, k * bs, d)
        pad = None  # additive 0 / -inf over the padding picks
        if not bool(valid.all()):
            invalid = (~valid)[:, :, None].expand(-1, -1, bs).reshape(self.hkv, g, 1, -1)
            pad = torch.zeros(invalid.shape, dtype=vv.dtype, device=vv.device).masked_fill_(invalid, float("-inf"))
        return kk, vv, pad

    def _cache_fetch(self, ids: torch.Tensor) -> torch.Tensor:
        """Ensure blocks `ids` are in the LRU cache (dequantizing misses). Returns a (NB,) slot map."""
        cfg, nb = self.cfg, self.num_blocks
        self.tick += 1
        need = ids.numel()
        cap = max(cfg.cache_blocks, need)
        if self.cache_k is None or self.cache_k.shape[1] < cap:
            old = (self.cache_k, self.cache_v, self.cache_ids, self.cache_used)
            dt = self.wv.buf.dtype
            # keys column-major per block (Hkv, C, D, bs): a gather then only moves bs-long runs
            self.cache_k = torch.zeros((self.hkv, cap, self.d, cfg.block_size), dtype=dt, device=ids.device)
            self.cache_v = torch.zeros((self.hkv, cap, cfg.block_size, self.d), dtype=dt, device=ids.device)
            self.cache_ids = torch.full((cap,), -1, dtype=torch.long, device=ids.device)
            self.cache_used = torch.zeros(cap, dtype=torch.long, device=ids.device)
            if old[0] is not None:
                c = old[0].shape[1]
                self.cache_k[:, :c], self.cache_v[:, :c] = old[0], old[1]
                self.cache_ids[:c], self.cache_used[:c] = old[2], old[3]
        slot_of = torch.full((nb,), -1, dtype=torch.long, device=ids.device)
        occupied = self.cache_ids >= 0
        slot_of[self.cache_ids[occupied]] = occupied.nonzero().squeeze(1)
        hit = slot_of[ids] >= 0
        self.cache_used[slot_of[ids[hit]]] = self.tick
        miss = ids[~hit]
        if miss.numel():
            # least recently used slots, never one a hit of this step sits in
            prio = torch.where(self.cache_used == self.tick, torch.iinfo(torch.long).max, self.cache_used)
            prio = torch.where(occupied, prio, -1)
            free = torch.sort(prio, stable=True).indices[: miss.numel()]
            evicted = self.cache_ids[free]
            slot_of[evicted[evicted >= 0]] = -1
            kb, vb = self._load_blocks(miss)  # (n, Hkv, bs, D)
            self.cache_k[:, free] = kb.permute(1, 0, 3, 2).to(self.cache_k.dtype)
            self.cache_v[:, free] = vb.transpose(0, 1).to(self.cache_v.dtype)
            self.cache_ids[free] = miss
            self.cache_used[free] = self.tick
            slot_of[miss] = free
            self.retrieved_total += miss.numel()
        return slot_of
