"""The KV memory's attention: one softmax over [selected blocks | far window | local window] for a
prefill chunk (`attend`), and for decode tokens through the kernel op `kv_memory_decode_attention`
(`attend_decode_tokens`: every decoding memory sequence of a step in ONE call -- Triton on CUDA, the
CPU-tuned torch path elsewhere)."""

from __future__ import annotations

import torch
from memserve.kernels import kv_memory_decode_attention
from memserve.runtime.attention import RotaryEmbedding, qk_view

from .buffers import _workspace
from .positions import _ChunkPlan


def _bmm_keys(qh: torch.Tensor, keys: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Logits (Hkv, G*T, N) of queries qh (Hkv, G*T, D) against column-major keys (Hkv, 1 or G, D, N):
    keys shared by a GQA group are one bmm with G*T rows (not G copies of the keys); per-query-head
    keys (granularity "q_head") are one bmm per head."""
    hkv, gt, d = qh.shape
    if keys.shape[1] == 1:
        return torch.bmm(qh, keys[:, 0], out=out)
    g = keys.shape[1]
    return torch.bmm(qh.reshape(hkv * g, gt // g, d), keys.reshape(hkv * g, d, -1), out=out.view(hkv * g, gt // g, -1))


def _bmm_vals(p: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """(Hkv, G*T, N) probabilities x values (Hkv, 1 or G, N, D) -> (Hkv, G*T, D)."""
    hkv, gt, n = p.shape
    if vals.shape[1] == 1:
        return torch.bmm(p, vals[:, 0])
    g = vals.shape[1]
    return torch.bmm(p.reshape(hkv * g, gt // g, n), vals.reshape(hkv * g, n, -1)).view(hkv, gt, -1)


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
    `_token_step`). Every store selects its blocks, then ONE `kv_memory_decode_attention` call attends
    all B. Returns (B, Hq, D)."""
    inputs = []
    for b, st in enumerate(stores):
        assert p0s[b] == st.n_tokens, f"token at {p0s[b]} but the memory holds {st.n_tokens} tokens"
        st.hq = q.shape[1]
        plan = st.plans.get(st.cfg, p0s[b], 1, st.n_sinks, st.buf_start, inv_freq, q)
        inputs.append(st._begin_token(q[b : b + 1], k[b : b + 1], v[b : b + 1], plan, scale))
    out, _, received = kv_memory_decode_attention(*_stack_inputs(inputs), scale=1.0)
    for st, r in zip(stores, received):
        st._end_token(r)
    return out


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
        cfg = self.cfg
        assert p0 == self.n_tokens, f"chunk starts at {p0} but the memory holds {self.n_tokens} tokens"
        t, hq, d = q.shape
        hkv, g = self.hkv, hq // self.hkv
        self.hq = hq
        plan = self.plans.get(cfg, p0, t, self.n_sinks, self.buf_start, inv_freq, q)
        if t == 1 and self._token_step(q):
            return self._attend_token(q, k, v, plan, scale)
        # the chunk joins the working set first (it attends to itself causally)
        self.wkeys.append(torch.stack((k, RotaryEmbedding.apply(k, plan.cos_l, plan.sin_l))).permute(0, 2, 3, 1))
        self.wv.append(v.transpose(0, 1))
        self.wscore.append(k.new_zeros((t, hkv), dtype=torch.float32))
        wk, wkr = self.wkeys.get()  # views, no copies
        wv = self.wv.get()

        def heads(x):  # (T, Hq, D) -> (Hkv, G*T, D), scaled
            return (x * scale).permute(1, 0, 2).reshape(hkv, g * t, d)

        q_loc = heads(RotaryEmbedding.apply(q, plan.cos_l, plan.sin_l))
        q_glob = RotaryEmbedding.apply(q, plan.cos_g, plan.sin_g) if plan.cos_g is not None else None
        # parts: (keys (Hkv, 1 or G, D, n) column-major, values (Hkv, 1 or G, n, D)) -- [selected blocks |
        # far | local]; the last part is scored with q_loc, the others with the n_local-rotated query
        parts, pad = [], None
        if self._uses_blocks():
            assert q_glob is not None  # blocks exist only once every query is engaged
            k_sel, v_sel, pad = self._retrieve(q_glob)
            parts.append((k_sel, v_sel))
        cdt = torch.promote_types(q.dtype, torch.float32)  # logits and softmax in fp32 at least
        cent, nc = None, 0  # unselected="centroid": [centroid columns] go first
        if cfg.policy.unselected == "centroid" and self.num_blocks:
            cent = self._unselected_part(cdt)
            parts.insert(0, (cent[0][:, None], cent[1][:, None]))
            nc = cent[0].shape[-1]
        if plan.f_end:
            parts.append((wk[:, None, :, : plan.f_end], wv[:, None, : plan.f_end]))
        parts.append((wkr[:, None, :, plan.l0 :], wv[:, None, plan.l0 :]))
        qh_g = heads(q_glob) if q_glob is not None else None
        if cdt != q.dtype:
            q_loc, qh_g = q_loc.to(cdt), qh_g.to(cdt) if qh_g is not None else None
            parts = [(kk.to(cdt), vv.to(cdt)) for kk, vv in parts]
        n_all = sum(kk.shape[3] for kk, _ in parts)
        # logits are written in place into a reused workspace: a fresh (Hkv, G*T, n) tensor per layer
        # (40 MB for a 512-token chunk) is mmap'ed and page-faulted on every call -- bmm into views +
        # in-place softmax measured 2.7x faster than bmm + cat + softmax (48 -> 18 ms, 27 -> 7 ms)
        lg = _workspace(hkv * g * t * n_all, cdt, q.device).view(hkv, g * t, n_all)
        off = 0
        for i, (kk, _) in enumerate(parts):
            n = kk.shape[3]
            _bmm_keys(q_loc if i == len(parts) - 1 else qh_g, kk, out=lg[..., off : off + n])
            off += n
        n_loc = wk.shape[-1] - plan.l0
        off_f = n_all - n_loc - plan.f_end  # where the far window columns start
        lg4 = lg.view(hkv, g, t, n_all)
        if pad is not None:  # heads that picked fewer blocks than others (padding)
            lg4[..., nc:off_f].add_(pad)
        if cent is not None:
            lg4[..., :nc].add_(cent[2])
        if plan.bias_f is not None:
            lg4[..., off_f : off_f + plan.f_end].add_(plan.bias_f)
        if plan.bias_l is not None:
            lg4[..., off_f + plan.f_end :].add_(plan.bias_l)
        p = torch.ops.aten._softmax.out(lg, -1, False, out=lg)  # one softmax over every part
        out, off = None, 0
        for _, val in parts:
            n = val.shape[-2]
            o = _bmm_vals(p[..., off : off + n], val).to(q.dtype)
            out = o if out is None else out.add_(o)
            off += n
        # attention each window key received (block representatives are its most-attended keys)
        received = p[..., off_f:].sum(1).T.float()  # (f_end + n_loc, Hkv)
        ws = self.wscore.get()
        if plan.f_end:
            ws[: plan.f_end].add_(received[: plan.f_end])
        ws[plan.l0 :].add_(received[plan.f_end :])  # (.add_: `view += x` also copies the view onto itself)
        self._advance(t)
        return out.view(hq, t, d).permute(1, 0, 2)  # (T, Hq, D)

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
        """Append the decode token and pick its blocks; returns this sequence's inputs of the decode op:
        (q_far, q_loc (1, Hq, D) scaled, keys (2, Hkv, D, W), values (Hkv, W, D), m, f, pad (Hkv, m) or None).

        A decode step on a CPU pays for every torch call (~2 us for a view, ~5-10 us for a small kernel,
        x 30 layers), so: the decode blocks sit in the front regions of the window buffers, making
        [blocks | far window] one product with the n_local-rotated query and every value one more; the
        softmax scale is folded into the query's RoPE tables. For T = 1 the far window columns are exactly
        [0, f_end) and the local ones [f_end, W) (l0 == f_end) and none is masked."""
        hkv = self.hkv
        hq = q.shape[1]
        # rows [q at n_local | k] and [q | k rotated], queries scaled (before engagement row 0 is unused)
        rot = RotaryEmbedding.apply(qk_view(q, k), *plan.token_tables(hq, hkv, scale))  # (2, Hq + Hkv, D)
        if self._zero_score is None:
            self._zero_score = k.new_zeros((1, hkv), dtype=torch.float32)
        self.wkeys.append(rot[:, hq:, :, None])  # (2, Hkv, D, 1): the key unrotated and rotated
        self.wv.append(v.transpose(0, 1))
        self.wscore.append(self._zero_score)
        m, pad = 0, None
        if self._uses_blocks():
            pad = self._retrieve(rot[:1, :hq])[2]  # the blocks sit in the front regions (may reallocate them)
            m = self.wkeys.front
        # columns [blocks (m) | far window (f) | local window]
        start = self.wkeys.front - m
        keys, vals = self.wkeys.with_front()[..., start:], self.wv.with_front()[:, start:]
        return rot[0:1, :hq], rot[1:2, :hq], keys, vals, m, plan.f_end, None if pad is None else pad[:, 0, 0]

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
