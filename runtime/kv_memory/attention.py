"""The KV memory's attention: one softmax over [selected blocks | far window | local window] for a
prefill chunk (`attend`, through the kernel op `kv_memory_chunk_attention`; `attend_chunks`: one chunk of
each of several sequences, block scoring in one call), and for decode tokens
through the kernel op `kv_memory_decode_attention` (`attend_decode_tokens`: every decoding memory
sequence of a step in ONE call). Both ops: Triton on CUDA, the CPU-tuned torch path elsewhere; this
file only lays out the memory's columns (which blocks, which window columns are far / local)."""

from __future__ import annotations

import torch
from memserve.kernels import kv_memory_chunk_attention, kv_memory_decode_attention, score_block_reprs
from memserve.runtime.attention import RotaryEmbedding, qk_view

from .positions import _ChunkPlan, rotate


def _stack_inputs(inputs: list) -> tuple:
    """Per-sequence `_begin_token` results -> the decode op's batched arguments (no copy for one sequence)."""
    if len(inputs) == 1:
        qf, ql, keys, vals, m, f, pad = inputs[0]
        return qf, ql, [keys], [vals], [m], [f], None if pad is None else [pad]
    qf, ql, keys, vals, ms, fs, pads = zip(*inputs)
    pads = None if all(p is None for p in pads) else list(pads)
    return torch.cat(qf), torch.cat(ql), list(keys), list(vals), list(ms), list(fs), pads


def attend_decode_tokens(stores: list, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p0s: list[int],
                         inv_freq: torch.Tensor, scale: float) -> torch.Tensor:
    """One decode token for each of B sequences at one layer: row b of q (B, Hq, D) / k, v (B, Hkv, D)
    (before RoPE) is sequence b's token, `stores[b]` its layer store (each must take the token path,
    `_token_step`). Every store appends its token; the stores whose step selects blocks by representatives
    are scored in ONE `score_block_reprs` call (per representative mode); each store then picks its blocks,
    and ONE `kv_memory_decode_attention` call attends all B. Returns (B, Hq, D)."""
    plans, rots = [], []
    for b, st in enumerate(stores):
        plans.append(st._plan(q[b : b + 1], p0s[b], inv_freq))
        rots.append(st._append_token(q[b : b + 1], k[b : b + 1], v[b : b + 1], plans[b], scale))
    scores = batched_repr_scores(stores, [rot[0, : q.shape[1]] for rot in rots])
    inputs = [st._token_inputs(rot, plan, s) for st, rot, plan, s in zip(stores, rots, plans, scores)]
    out, _, received = kv_memory_decode_attention(*_stack_inputs(inputs), scale=1.0)
    for st, r in zip(stores, received):
        st._end_token(r)
    return out


def batched_repr_scores(stores: list, queries: list, ts: list[int] | None = None) -> list:
    """Block scores by representative for every store whose next selection (of ts[b] queries, default 1)
    takes them (`_repr_scoring_due`), in one `score_block_reprs` call per representative mode over those
    sequences (ragged block counts); None for the others (reused selection, exact scoring, no blocks).
    queries[b]: (Hq, D), the query the store's blocks are scored with (a chunk's: its mean)."""
    out = [None] * len(stores)
    by_mode: dict[str, list[int]] = {}
    for b, st in enumerate(stores):
        if st._repr_scoring_due(1 if ts is None else ts[b]):
            by_mode.setdefault(st.cfg.policy.repr_mode, []).append(b)
    for mode, rows in by_mode.items():
        qs = torch.stack([queries[b] for b in rows])
        got = score_block_reprs(qs, [stores[b].reprs.get().to(qs.dtype) for b in rows], mode)
        for b, sc in zip(rows, got):
            out[b] = sc
    return out


def attend_chunks(stores: list, qs: list, ks: list, vs: list, p0s: list[int], inv_freq: torch.Tensor,
                  scale: float) -> list:
    """One prefill chunk for each of B sequences at one layer (`attend` of each; a sequence's own chunks
    depend on each other, different sequences' do not): every store appends its chunk, the stores whose
    chunk selects blocks by representatives are scored in one `score_block_reprs` call (per mode), then
    each chunk attends through `kv_memory_chunk_attention`. Returns B (T_b, Hq, D) outputs."""
    staged = []
    for st, q, k, v, p0 in zip(stores, qs, ks, vs, p0s):
        plan = st._plan(q, p0, inv_freq)
        if q.shape[0] == 1 and st._token_step(q):  # a one-token piece takes the token path, as in `attend`
            staged.append(st._attend_token(q, k, v, plan, scale))
        else:
            staged.append((plan, *st._append_chunk(q, k, v, plan)))
    rows = [b for b, x in enumerate(staged) if isinstance(x, tuple) and x[2] is not None]
    scores = batched_repr_scores([stores[b] for b in rows], [staged[b][2].mean(0) for b in rows],
                                 [qs[b].shape[0] for b in rows])
    by_row = dict(zip(rows, scores))
    return [x if not isinstance(x, tuple) else stores[b]._attend_chunk(*x, scale, by_row.get(b))
            for b, x in enumerate(staged)]


class AttentionMixin:
    """Attention methods of KVLayerStore (state lives in store.py)."""

    token_path = True  # single decode tokens take `_attend_token` (False: the chunk path; tests compare them)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p0: int, inv_freq: torch.Tensor,
               scale: float) -> torch.Tensor:
        """Attention of a chunk of T consecutive tokens starting at position p0 (= tokens seen so far).

        q (T, Hq, D), k/v (T, Hkv, D), all before RoPE. Returns (T, Hq, D); appends k/v to the memory.
        Logits are laid out (Hkv, G*T, columns): [selected blocks | far window columns | local window
        columns], one softmax over all of them.
        """
        plan = self._plan(q, p0, inv_freq)
        if q.shape[0] == 1 and self._token_step(q):
            return self._attend_token(q, k, v, plan, scale)
        return self._attend_chunk(plan, *self._append_chunk(q, k, v, plan), scale)

    def _plan(self, q: torch.Tensor, p0: int, inv_freq: torch.Tensor) -> _ChunkPlan:
        assert p0 == self.n_tokens, f"chunk starts at {p0} but the memory holds {self.n_tokens} tokens"
        self.hq = q.shape[1]
        self._inv_freq = inv_freq
        return self.plans.get(self.cfg, p0, q.shape[0], self.n_sinks, self.buf_start, inv_freq, q)

    def _append_chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _ChunkPlan):
        """The chunk joins the working set first (it attends to itself causally); returns its queries at
        their positions and (engaged chunks) at n_local: (q_loc, q_glob or None), each (T, Hq, D)."""
        t = q.shape[0]
        self.wkeys.append(torch.stack((k, RotaryEmbedding.apply(k, plan.cos_l, plan.sin_l))).permute(0, 2, 3, 1))
        self.wv.append(v.transpose(0, 1))
        self.wscore.append(k.new_zeros((t, self.hkv), dtype=torch.float32))
        q_loc = RotaryEmbedding.apply(q, plan.cos_l, plan.sin_l)
        q_glob = RotaryEmbedding.apply(q, plan.cos_g, plan.sin_g) if plan.cos_g is not None else None
        return q_loc, q_glob

    def _attend_chunk(self, plan: _ChunkPlan, q_loc: torch.Tensor, q_glob: torch.Tensor | None, scale: float,
                      repr_scores: torch.Tensor | None = None) -> torch.Tensor:
        """The chunk's attention after `_append_chunk` (repr_scores: its block scores when a batch computed them)."""
        if q_glob is not None and self._ordered(q_loc.shape[0]):
            return self._attend_chunk_ordered(plan, q_loc, q_glob, scale, repr_scores)
        wk, wkr = self.wkeys.get()  # views, no copies
        wv = self.wv.get()
        # segments of one softmax, in column order: [centroid columns | selected blocks | far window | local
        # window]; the local one is scored with the query at its true position, the others at n_local
        segs = []
        if self._uses_blocks():
            assert q_glob is not None  # blocks exist only once every query is engaged
            k_sel, v_sel, pad = self._retrieve(q_glob, repr_scores)
            segs.append((k_sel, v_sel, pad, False))
        if self.cfg.policy.unselected == "centroid" and self.num_blocks:  # after _retrieve: it masks the picks
            ck, cv, cb = self._unselected_part(torch.promote_types(q_loc.dtype, torch.float32))
            segs.insert(0, (ck[:, None], cv[:, None], cb, False))
        if plan.f_end:
            segs.append((wk[:, None, :, : plan.f_end], wv[:, None, : plan.f_end], plan.bias_f, False))
        segs.append((wkr[:, None, :, plan.l0 :], wv[:, None, plan.l0 :], plan.bias_l, True))
        n_loc = wk.shape[-1] - plan.l0
        out, received = kv_memory_chunk_attention(q_glob, q_loc, segs, plan.f_end + n_loc, scale)
        # attention each window key received (block representatives are its most-attended keys)
        received = received.T  # (f_end + n_loc, Hkv)
        ws = self.wscore.get()
        if plan.f_end:
            ws[: plan.f_end].add_(received[: plan.f_end])
        ws[plan.l0 :].add_(received[plan.f_end :])  # (.add_: `view += x` also copies the view onto itself)
        self._advance(q_loc.shape[0])
        return out  # (T, Hq, D)

    def _attend_chunk_ordered(self, plan: _ChunkPlan, q_loc: torch.Tensor, q_glob: torch.Tensor, scale: float,
                              repr_scores: torch.Tensor | None) -> torch.Tensor:
        """`_attend_chunk` under RetrievalPolicy.positions "ordered" (positions.py), for a chunk with engaged
        queries: one softmax over [selected blocks (rotated at their ordered positions by `_retrieve`) | sinks
        unrotated (engaged queries) | sinks at true positions (queries not engaged yet) | buffer at true
        positions], the engaged queries rotated at G = p + (n_s + k*bs - buf_start). Blocks are still selected
        with q_glob (the query at n_local against unrotated representatives), as under "infllm"."""
        wk, wkr = self.wkeys.get()
        wv = self.wv.get()
        n_s, base, sink_far, sink_loc, causal = plan.ordered_biases(self.cfg.n_init, self.cfg.dense_limit,
                                                                    q_loc.device)
        segs, k_cols = [], 0
        if self._uses_blocks():
            k_sel, v_sel, pad = self._retrieve(q_glob, repr_scores)
            segs.append((k_sel, v_sel, pad, False))
            k_cols = k_sel.shape[-1]
        if n_s:
            segs.append((wk[:, None, :, :n_s], wv[:, None, :n_s], sink_far, False))
        if sink_loc is not None:
            segs.append((wkr[:, None, :, :n_s], wv[:, None, :n_s], sink_loc, True))
        segs.append((wkr[:, None, :, n_s:], wv[:, None, n_s:], causal, True))
        q_ord = rotate(q_loc, torch.tensor([base + k_cols], device=q_loc.device), self._inv_freq.to(q_loc.device))
        out, received = kv_memory_chunk_attention(q_ord, q_loc, segs, wk.shape[-1], scale)
        self.wscore.get().add_(received.T)  # every window column, sinks included (their scores are unused)
        self._advance(q_loc.shape[0])
        return out

    def _ordered(self, t: int) -> bool:
        """Whether this step (t tokens from self.n_tokens) uses the "ordered" position scheme."""
        pos = self.cfg.policy.positions
        if pos == "infllm":
            return False
        return pos == "ordered" or (self.prompt_end is not None and self.prompt_end <= self.n_tokens + t)

    def _attend_token(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _ChunkPlan,
                      scale: float) -> torch.Tensor:
        """`attend` for one decode token: the same attention as the chunk path, through the kernel op
        `kv_memory_decode_attention` (one sequence; `attend_decode_tokens` batches many)."""
        inputs = self._begin_token(q, k, v, plan, scale)
        out, _, received = kv_memory_decode_attention(*_stack_inputs([inputs]), scale=1.0)
        self._end_token(received[0])
        return out

    def _token_step(self, q: torch.Tensor) -> bool:
        """Whether a single decode token takes the token path (the kernel op) rather than the chunk path."""
        # unselected="centroid" (an option, default off) adds centroid columns the op does not take yet:
        # those steps take the chunk path, which attends them in the same one softmax
        pol = self.cfg.policy
        return (self.token_path and q.dtype in (torch.float32, torch.float64) and pol.granularity != "q_head"
                and pol.unselected != "centroid")

    def _begin_token(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _ChunkPlan, scale: float):
        """Append the decode token and pick its blocks (one sequence; `attend_decode_tokens` does the same
        in phases over many): this sequence's inputs of the decode op."""
        return self._token_inputs(self._append_token(q, k, v, plan, scale), plan)

    def _append_token(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _ChunkPlan,
                      scale: float) -> torch.Tensor:
        """Append the decode token to the window; returns rows (2, Hq + Hkv, D): [q at n_local, scaled | k],
        [q at its position, scaled | k rotated] (before engagement row 0's q is unused).

        A decode step on a CPU pays for every torch call (~2 us for a view, ~5-10 us for a small kernel,
        x 30 layers), so: the decode blocks sit in the front regions of the window buffers, making
        [blocks | far window] one product with the n_local-rotated query and every value one more; the
        softmax scale is folded into the query's RoPE tables."""
        hkv = self.hkv
        hq = q.shape[1]
        rot = RotaryEmbedding.apply(qk_view(q, k), *plan.token_tables(hq, hkv, scale))  # (2, Hq + Hkv, D)
        if self._zero_score is None:
            self._zero_score = k.new_zeros((1, hkv), dtype=torch.float32)
        self.wkeys.append(rot[:, hq:, :, None])  # (2, Hkv, D, 1): the key unrotated and rotated
        self.wv.append(v.transpose(0, 1))
        self.wscore.append(self._zero_score)
        return rot

    def _token_inputs(self, rot: torch.Tensor, plan: _ChunkPlan, scores: torch.Tensor | None = None):
        """Pick the token's blocks (scores: its representative scores when computed in a batch, else None)
        and return its inputs of the decode op: (q_far, q_loc (1, Hq, D) scaled, keys (2, Hkv, D, W), values
        (Hkv, W, D), m, f, pad (Hkv, m) or None). For T = 1 the far window columns are exactly [0, f_end)
        and the local ones [f_end, W) (l0 == f_end) and none is masked."""
        hq = rot.shape[1] - self.hkv
        m, pad = 0, None
        if self._uses_blocks():
            pad = self._retrieve(rot[:1, :hq], scores)[2]  # the blocks sit in the front regions (may reallocate them)
            m = self.wkeys.front
        # columns [blocks (m) | far window (f) | local window]
        start = self.wkeys.front - m
        keys, vals = self.wkeys.with_front()[..., start:], self.wv.with_front()[:, start:]
        q_far, q_loc, f = rot[0:1, :hq], rot[1:2, :hq], plan.f_end
        if plan.cos_g is not None and self._ordered(1):
            # "ordered": the blocks in the front region were rotated at their ordered positions when the slots
            # were filled (`_refill`); the sinks (row 0, unrotated) are the only far columns; the query for
            # both is the scaled one at p turned by G - p = n_s + m - buf_start
            n_s, buf_start = plan.key[2], plan.key[3]
            q_loc = q_loc.contiguous()  # the Triton op wants q_far and q_loc with equal strides
            q_far = rotate(q_loc, torch.tensor([n_s + m - buf_start], device=rot.device), self._inv_freq.to(rot.device))
            f = n_s
        return q_far, q_loc, keys, vals, m, f, None if pad is None else pad[:, 0, 0]

    def _end_token(self, received: torch.Tensor) -> None:
        """After the op: record the attention each window key received (Hkv, W - m) and pack full blocks."""
        self.wscore.get().add_(received.T)
        self._advance(1)

    def _uses_blocks(self) -> bool:
        """Whether this step attends memory blocks (there are some and the layer's top-k is not 0)."""
        return bool(self.num_blocks) and self.cfg.policy.topk_for(self.layer, self.num_blocks) > 0

    def _advance(self, t: int) -> None:
        """t tokens were appended: pack the full blocks that left the local window."""
        self.n_tokens += t
        nf = max(0, (self.wkeys.n - self.n_sinks + 1 - self.cfg.n_local) // self.cfg.block_size)
        if nf:
            self._pack(nf)
