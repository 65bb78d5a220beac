"""The KV memory's position schemes: RoPE at chosen positions, the per-chunk plan shared by a
sequence's layers (which window columns are far / local), and the float64 dense references under each
scheme that the tests compare against.

"infllm" (RetrievalPolicy.positions default): an engaged query sees every memory key (sinks, selected
blocks, window tokens past n_local) at distance n_local: no order among the retrieved blocks or within them.
"ordered": an engaged query at position p sees the window buffer at its true positions, the k selected
blocks of its KV head in their original order at consecutive positions just before the buffer, and the sinks
at one position before them (query at G = n_s + k*bs + (p - buf_start), block s of k (sorted) token j at
n_s + s*bs + j, sinks unrotated at 0). With every block selected G = p: dense RoPE attention whose sinks
sit at position 0 (`reference_attention_ordered`). Distances stay below n_s + k*bs + n_local + bs, inside the
trained window for the retrieval budgets used."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from memserve.runtime.attention import RotaryEmbedding

from .config import KVMemoryConfig


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE at arbitrary positions, in inv_freq's precision (fp64 for the reference below), through
    the engine's `RotaryEmbedding.apply`. x (T, H, D), positions (T,) -> (T, H, D)."""
    return RotaryEmbedding.apply(x, *RotaryEmbedding.tables(positions, inv_freq, x.dtype))


@dataclass(slots=True)
class _ChunkPlan:
    """What every layer of a sequence shares for one chunk (positions, RoPE tables, which window
    columns are far / local and their masks): built by the first layer, reused by the other 29.

    Window columns are [sinks | buffer] in position order. Column j is *far* for query i when the
    query is engaged and p_i - p_j >= n_local (scored with the n_local-rotated query against the
    unrotated key), *local* when 0 <= p_i - p_j < n_local or the query is not engaged (true RoPE
    distance). Far columns form a prefix [0, f_end) and local ones a suffix [l0, W); the band where
    they overlap (< T columns) is masked on each side, so every (query, key) pair counts once.
    """

    key: tuple
    cos_l: torch.Tensor  # (T, 1, D) at the true positions
    sin_l: torch.Tensor
    cos_g: torch.Tensor | None  # (1, 1, D) at n_local (engaged chunks only)
    sin_g: torch.Tensor | None
    f_end: int
    l0: int
    bias_f: torch.Tensor | None  # (T, f_end) 0 / -inf, None if nothing is masked
    bias_l: torch.Tensor | None  # (T, W - l0)
    token_rope: tuple | None = None  # decode: (cos, sin) of token_tables
    ordered_bias: tuple | None = None  # "ordered" chunks: `ordered_biases`, built once per chunk

    def ordered_biases(self, n_init: int, dl: int, dev) -> tuple:
        """"ordered" chunk layout: (n_sink, shift_base, sinks seen unrotated at position 0: 0 / -inf per engaged
        query or None when all are engaged, sinks at their true positions for queries not engaged or None
        when all are, the buffer columns' causal mask (T, W - n_sink) or None). The sinks are the first
        min(n_init, W) window columns (a chunk from position < n_init holds them in its buffer part);
        shift_base = n_sink - (position of the first buffer column): G - p without the blocks."""
        if self.ordered_bias is None:
            p0, t, n_s, buf_start = self.key[:4]
            wpos = torch.cat((torch.arange(n_s, device=dev), torch.arange(buf_start, p0 + t, device=dev)))
            ns = min(n_init, wpos.shape[0])
            pos = torch.arange(p0, p0 + t, device=dev)
            eng = (pos >= dl)[:, None].expand(t, ns)
            neg = torch.tensor(float("-inf"), dtype=torch.promote_types(self.cos_l.dtype, torch.float32), device=dev)

            def bias(ok):
                return None if bool(ok.all()) else torch.where(ok, 0.0, neg)

            far = bias(eng) if ns else None  # (this path runs only for chunks with an engaged query)
            loc = None if not ns or bool(eng.all()) else bias(~eng & (wpos[None, :ns] <= pos[:, None]))
            base = ns - int(wpos[ns]) if wpos.shape[0] > ns else 0
            self.ordered_bias = (ns, base, far, loc, bias(wpos[None, ns:] <= pos[:, None]))
        return self.ordered_bias

    def token_tables(self, hq: int, hkv: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """For one decode token: RoPE tables (2, Hq + Hkv, D) that turn cat(q, k) (broadcast over 2 rows) into
        [[q at n_local, scaled | k unrotated], [q at its position, scaled | k at its position]] in one
        `RotaryEmbedding.apply` (rotation is linear: the softmax scale folds into the query's tables)."""
        if self.token_rope is None or self.token_rope[0].shape[1] != hq + hkv:
            eng = self.cos_g is not None
            one, zero = torch.ones_like(self.cos_l), torch.zeros_like(self.sin_l)
            self.token_rope = tuple(torch.cat((
                torch.cat(((g if eng else loc).expand(1, hq, -1) * scale, ident.expand(1, hkv, -1)), 1),
                torch.cat((loc.expand(1, hq, -1) * scale, loc.expand(1, hkv, -1)), 1)))
                for g, loc, ident in ((self.cos_g, self.cos_l, one), (self.sin_g, self.sin_l, zero)))
        return self.token_rope

    @staticmethod
    def build(key, cfg: KVMemoryConfig, p0: int, t: int, n_s: int, buf_start: int, inv_freq, dtype, dev):
        pos = torch.arange(p0, p0 + t, device=dev)
        wpos = torch.cat((torch.arange(n_s, device=dev), torch.arange(buf_start, p0 + t, device=dev)))
        cos_l, sin_l = RotaryEmbedding.tables(pos, inv_freq, dtype)
        dl, nl = cfg.dense_limit, cfg.n_local
        eng_any, eng_all = p0 + t - 1 >= dl, p0 >= dl
        cos_g = sin_g = None
        f_end, l0 = 0, 0
        if eng_any:
            cos_g, sin_g = RotaryEmbedding.tables(torch.tensor([nl], device=dev), inv_freq, dtype)
            f_end = int((wpos <= p0 + t - 1 - nl).sum())
        if eng_all:
            l0 = int((wpos < p0 - nl + 1).sum())
        dist = pos[:, None] - wpos[None, :]  # (T, W)
        engaged = (pos >= dl)[:, None]
        far_ok = engaged & (dist >= nl)
        loc_ok = (dist >= 0) & (~engaged | (dist < nl))
        # in the logits' dtype (attend: fp32 at least)
        neg = torch.tensor(float("-inf"), dtype=torch.promote_types(dtype, torch.float32), device=dev)

        def bias(ok):
            return None if bool(ok.all()) else torch.where(ok, 0.0, neg)

        return _ChunkPlan(key, cos_l, sin_l, cos_g, sin_g, f_end, l0, bias(far_ok[:, :f_end]), bias(loc_ok[:, l0:]))


class _PlanCache:
    """The last chunk plan of a sequence, shared by its layers (they run the same chunks in order)."""

    __slots__ = ("plan",)

    def __init__(self):
        self.plan: _ChunkPlan | None = None

    def get(self, cfg, p0, t, n_s, buf_start, inv_freq, x: torch.Tensor) -> _ChunkPlan:
        key = (p0, t, n_s, buf_start, x.dtype, x.device, inv_freq.data_ptr())
        if self.plan is None or self.plan.key != key:
            self.plan = _ChunkPlan.build(key, cfg, p0, t, n_s, buf_start, inv_freq, x.dtype, x.device)
        return self.plan



def _reference_two_schemes(q, k, v, inv_freq, scale, q_far_pos, far):
    """Dense float64 attention of ONE sequence from position 0 (q (T, Hq, D), k/v (T, Hkv, D)) in which the
    pairs `far(pos_i, pos_j)` (T, T) score the query rotated at q_far_pos(pos) against the key unrotated, and
    every other pair has true RoPE distances."""
    q, k, v = q.double(), k.double(), v.double()
    t, hq, d = q.shape
    g = hq // k.shape[1]
    pos = torch.arange(t)
    inv = inv_freq.double()
    ql, kl = rotate(q, pos, inv), rotate(k, pos, inv)
    qn = rotate(q, q_far_pos(pos), inv)
    s_loc = torch.einsum("thd,shd->hts", ql, kl.repeat_interleave(g, dim=1))
    s_far = torch.einsum("thd,shd->hts", qn, k.repeat_interleave(g, dim=1))
    dist = pos[:, None] - pos[None, :]
    s = torch.where(far(pos[:, None], pos[None, :]), s_far, s_loc).masked_fill(dist < 0, float("-inf")) * scale
    p = torch.softmax(s, -1)
    return torch.einsum("hts,shd->thd", p, v.repeat_interleave(g, dim=1))


def reference_attention(q, k, v, inv_freq, scale, n_init, n_local):
    """Dense attention under the KV-memory position scheme, for tests: every key attended.

    q (T, Hq, D), k/v (T, Hkv, D) for ONE sequence from position 0, computed in float64.
    A key at distance d from an engaged query (p >= n_init + n_local) sits at min(d, n_local).
    """
    return _reference_two_schemes(q, k, v, inv_freq, scale, lambda pos: torch.full_like(pos, n_local),
                                  lambda i, j: (i >= n_init + n_local) & (i - j >= n_local))


def ordered_slot_positions(ids: torch.Tensor, valid: torch.Tensor, n_s: int, bs: int) -> torch.Tensor:
    """"ordered" positions of picked blocks' tokens: ids/valid (H, S) block ids per head (any order; invalid
    = padding) -> (H, S*bs) positions, block of sorted rank s among a head's c valid picks at
    n_s + (S - c + s)*bs + j (right-aligned: the last pick sits just before the window at every head)."""
    h, s = ids.shape
    key = torch.where(valid, ids, torch.iinfo(torch.long).max)
    rank = key.argsort(dim=1, stable=True).argsort(dim=1)
    slot = rank + (s - valid.sum(1, keepdim=True))  # padding ranks past S: masked anyway
    return (n_s + slot[..., None] * bs + torch.arange(bs, device=ids.device)).reshape(h, s * bs)


def rotate_columns(keys: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Column-major keys (H, D, N) rotated at positions pos (H, N): a new contiguous (H, D, N)."""
    h, d, n = keys.shape
    cos, sin = RotaryEmbedding.tables(pos.reshape(-1), inv_freq, keys.dtype)  # (H*N, 1, D)
    out = RotaryEmbedding.apply(keys.transpose(1, 2).reshape(h * n, 1, d), cos, sin)
    return out.view(h, n, d).transpose(1, 2).contiguous()


def reference_attention_ordered(q, k, v, inv_freq, scale, n_init, n_local):
    """Dense attention under the "ordered" scheme with every block selected, float64, for tests: true RoPE
    distances, except that an engaged query (p >= n_init + n_local) sees the sinks (j < n_init) unrotated,
    i.e. at position 0."""
    return _reference_two_schemes(q, k, v, inv_freq, scale, lambda pos: pos,
                                  lambda i, j: (i >= n_init + n_local) & (j < n_init))


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
