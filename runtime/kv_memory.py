"""Retrieval-based KV memory (InfLLM-style): attention sinks + local window + memory blocks.

Per sequence and layer (`LayerMemory`):
  sinks   -- the first `n_init` tokens, kept in full precision on the device tier;
  buffer  -- every later token not yet packed into a block (the local window plus a remainder < one
             block), full precision, with the attention each token has received so far;
  blocks  -- `block_size` tokens that left the local window, held in the memory tier compressed
             (KIVI int8 default / int4 / fp16 / none), each with representative(s) on the device tier;
  cache   -- an LRU of recently retrieved blocks, dequantized (device working set of prefill chunks);
  slots   -- decode's working set: the selected blocks per KV head, dequantized in front of the buffer.
Keys are stored WITHOUT rotary position (the backend receives q/k before RoPE).

Position scheme (InfLLM): for a query at position p and a key at j, with d = p - j,
  * before the memory engages (p < n_init + n_local) every key is at its true distance: dense attention;
  * afterwards keys with d < n_local (the local window) keep their true distance, and every other key --
    sinks, memory blocks, the remainder -- sits at distance exactly n_local (query rotated by n_local,
    key unrotated). Positions past the trained window never reach the rotary embedding.
One softmax spans sinks + selected blocks + buffer. With every block selected and compression "none"
this is exactly dense attention under that scheme (`reference_attention`, tested in float64).

All work is vectorized over tokens, heads and blocks (no Python loop per token or block); the torch
path stands in for memserve.kernels' block-sparse decode kernel on CPU.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from memserve.runtime.attention import RotaryEmbedding, qk_view
from memserve.runtime.kv_memory_quant import (
    COMPRESSIONS,
    QuantizedBlocks,
    dequantize,
    dequantize_block_heads,
    quantize,
)
from memserve.scheduler.kv_policy import RetrievalPolicy, block_scores, blocks_to_evict, select_blocks


@dataclass(slots=True)
class KVMemoryConfig:
    """Engine-level defaults of the KV memory (per-request overrides: mode off/retrieval, topk)."""

    n_init: int = 128  # attention sinks (InfLLM/StreamingLLM)
    # local window. InfLLM uses 4096; on SmolLM2-135M a passkey at 2k tokens with EVERY block attended
    # was found with n_local 256 / 512 and missed with 1024 (and dense misses at 4k): the fewer tokens
    # sit at a long true distance, the better this model retrieves (bench/kv_memory_probe.py).
    n_local: int = 512
    block_size: int = 64
    repr_topk: int = 4  # tokens per block that form its representative(s)
    compression: str = "int8"
    # KIVI groups, fp16 scale/min. 64/64 instead of KIVI's 32 so that int4 blocks take 0.281x of fp16 KV
    # per token (32/32: 0.31x, over the issue's <= 0.3x). Value groups of 32 (0.297x) answered the one int4
    # passkey miss (32k, depth 10%) and lost three other cells (ablation section 7); keys decide it (section 8)
    key_group: int = 64  # tokens per (scale, min) of a key channel
    value_group: int = 64  # channels per (scale, min) of a value token
    # int4 memory: layers whose keys are stored int8 (values stay int4). On the one int4 passkey miss (32k,
    # depth 10%) fp16 keys everywhere find the needle and fp16 values do not; bisected over layers, int8
    # keys in layers 18-21 find it, at 0.298x of fp16 KV instead of 0.281x (ablation section 8). Measured
    # on SmolLM2-135M (30 layers); indices past a model's layers are ignored
    int4_int8_key_layers: tuple[int, ...] = (18, 19, 20, 21)
    # int8/int4: per block and KV head, keys / values of the tokens that received the most attention while in
    # the window kept in fp16 (kv_memory_quant; 2 rows of 64 add 0.016x). Off: within 0.3x they did not
    # answer that cell (ablation section 8)
    exact_keys: int = 0
    exact_values: int = 0
    # explicit per-layer compression of the memory tier, ahead of the above: ((layer, key kind, value kind), ...)
    layer_compression: tuple[tuple[int, str, str], ...] = ()
    cache_blocks: int = 64  # LRU device cache of dequantized blocks, per layer
    budget_bytes: int | None = None  # memory-tier budget per sequence/session (all layers); None = unbounded
    # prefill chunk once the memory is engaged. Each chunk selects its blocks with its mean query, so a
    # smaller chunk follows the text more closely: 256 instead of 512 answers the passkey 32k seed-1
    # depth-90% cell that fp16, int8 and int4 memory all missed with 512, at the same prefill time
    # (229 s vs 230 s at 1 thread; ablation section 9)
    chunk_size: int = 256
    policy: RetrievalPolicy = None  # type: ignore[assignment]

    def __post_init__(self):
        if self.policy is None:
            self.policy = RetrievalPolicy()
        assert self.n_init >= 0 and self.n_local >= 1 and self.block_size >= 1
        assert 1 <= self.repr_topk <= self.block_size, "repr_topk must be in [1, block_size]"
        assert 0 <= self.exact_values <= self.block_size and 0 <= self.exact_keys <= self.block_size, \
            "exact_values and exact_keys must be in [0, block_size]"
        self.layer_compression = tuple((int(l), k, v) for l, k, v in self.layer_compression)  # JSON gives lists
        self.int4_int8_key_layers = tuple(int(l) for l in self.int4_int8_key_layers)
        kinds = {self.compression, *(x for _, k, v in self.layer_compression for x in (k, v))}
        assert kinds <= set(COMPRESSIONS), f"compression must be one of {COMPRESSIONS}"
        assert self.chunk_size >= 1 and self.cache_blocks >= 1
        if kinds & {"int8", "int4"}:
            assert self.block_size % self.key_group == 0, "block_size must be a multiple of key_group"
        if self.budget_bytes is not None:
            assert self.budget_bytes > 0

    def kinds(self, layer: int) -> tuple[str, str]:
        """(key, value) compression of a layer's memory tier."""
        for l, k, v in self.layer_compression:
            if l == layer:
                return k, v
        if self.compression == "int4" and layer in self.int4_int8_key_layers:
            return "int8", "int4"
        return self.compression, self.compression

    @property
    def dense_limit(self) -> int:
        """Sequences up to this many tokens attend exactly like dense attention."""
        return self.n_init + self.n_local


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


_WORKSPACE = threading.local()


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat scratch buffer reused across calls (per thread, dtype and device), grown on demand."""
    bufs = _WORKSPACE.__dict__.setdefault("bufs", {})
    buf = bufs.get((dtype, device))
    if buf is None or buf.numel() < numel:
        buf = bufs[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


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


_PARTS = ("data", "scale", "min", "exact", "exact_idx")  # QuantizedBlocks' tensors, in its field order
_STORE_FIELDS = tuple(f"{x}_{part}" for x in "kv" for part in _PARTS)


class LayerMemory:
    """KV memory of one sequence in one layer. `attend` runs a chunk's attention and appends its KV."""

    token_path = True  # single decode tokens take `_attend_token` (False: the chunk path; tests compare them)

    def __init__(self, cfg: KVMemoryConfig, layer: int, num_kv_heads: int, head_dim: int, num_layers: int = 1,
                 plans: _PlanCache | None = None):
        self.cfg, self.layer, self.hkv, self.d = cfg, layer, num_kv_heads, head_dim
        self.plans = plans if plans is not None else _PlanCache()  # shared by a sequence's layers
        self.num_layers = num_layers  # the session budget is split evenly over the layers
        self.n_tokens = 0  # tokens appended so far (= position of the next token)
        self.hq = num_kv_heads  # query heads, known from the first chunk
        # working set rows = [sinks (n_s) | buffer (n_b)], grown in place (no per-step concatenation).
        # Keys (2, Hkv, D, W): [0] without RoPE (far columns; packed into blocks), [1] rotated at their
        # absolute positions (local attention) -- one buffer, so a decode step appends both with one copy.
        # Column-major: logits are then a plain q @ K bmm. A (3x64) @ (64x640) decode product measured
        # 3-5x faster than against a transposed (W, Hkv, D) view on this CPU
        self.wkeys = _Rows(dim=-1)
        self.wv = _Rows(dim=1)  # (Hkv, W, D) values
        self.wscore = _Rows()  # (W, Hkv) attention each token received while in the buffer
        self._zero_score: torch.Tensor | None = None  # a decode step's wscore row
        self.store = {f: _Rows() for f in _STORE_FIELDS}  # memory tier, rows = blocks (kv_memory_quant)
        self.reprs = _Rows(dim=2)  # (Hkv, D, NB, R) column-major: scoring is one bmm, no permuting copy
        self.block_pos = _Rows()  # (NB,) first position of each block
        self.sel_count = _Rows()  # (NB,) how often each block was selected (eviction by importance)
        self.sticky: torch.Tensor | None = None  # (Hq, NB) bool: last prefill chunk's selection
        # decode working set: the picked blocks in slots of `block_size` columns, one row of slots per
        # selection unit; dec_slots (rows, S) holds each slot's block id (-1: empty). For KV-head / shared
        # selection the slots are the front regions of self.wkeys[0] and self.wv (one product spans blocks
        # and window: 3 bmm per decode step instead of 5, 279 -> 238 us per layer at 32k), and self.dec is
        # (None, None, padding); for "q_head" it is the (k, v, padding) gathered through the LRU cache
        self.dec = None
        self.dec_slots: torch.Tensor | None = None
        self.dec_age = 0  # decode steps that used self.dec
        self.cache_k = self.cache_v = None  # (Hkv, C, bs, D) LRU of dequantized blocks
        self.cache_ids: torch.Tensor | None = None  # (C,) block id per slot, -1 empty
        self.cache_used: torch.Tensor | None = None  # (C,) tick of last use
        self.tick = 0
        self.retrieved_total = 0  # blocks moved memory tier -> device (prefill: whole blocks; decode: one KV head each)
        self.selected_total = 0  # block selections (summed over heads and steps)
        self.evicted_total = 0
        self.record_scores = False
        self.last_scores: torch.Tensor | None = None

    # ------------------------------------------------------------------ sizes
    @property
    def num_blocks(self) -> int:
        return self.block_pos.n

    @property
    def n_sinks(self) -> int:
        return min(self.n_tokens, self.cfg.n_init)

    @property
    def buf_start(self) -> int:
        return self.n_tokens - (self.wkeys.n - self.n_sinks)

    def memory_tier_bytes(self) -> int:
        return sum(r.nbytes() for r in self.store.values())

    def device_tier_bytes(self) -> int:
        n = self.reprs.nbytes() + self.wkeys.nbytes(front=True) + self.wv.nbytes(front=True)
        if self.cache_k is not None:
            used = int((self.cache_ids >= 0).sum())
            n += used * sum(c[:, 0].numel() * c.element_size() for c in (self.cache_k, self.cache_v))
        if self.dec is not None and self.dec[0] is not None:
            n += sum(x.numel() * x.element_size() for x in self.dec[:2])
        return n

    def bytes_per_block(self) -> int:
        return self.memory_tier_bytes() // max(1, self.num_blocks)

    # ------------------------------------------------------------------ attention
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
        if (t == 1 and self.token_path and q.dtype in (torch.float32, torch.float64)
                and cfg.policy.granularity != "q_head"):
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
        if plan.f_end:
            parts.append((wk[:, None, :, : plan.f_end], wv[:, None, : plan.f_end]))
        parts.append((wkr[:, None, :, plan.l0 :], wv[:, None, plan.l0 :]))
        qh_g = heads(q_glob) if q_glob is not None else None
        cdt = torch.promote_types(q.dtype, torch.float32)  # logits and softmax in fp32 at least
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
            lg4[..., :off_f].add_(pad)
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
        """`attend` for one decode token in as few kernels as possible -- the same attention as the chunk
        path. A decode step on a CPU pays for every torch call (~2 us for a view, ~5-10 us for a small
        kernel, x 30 layers): this path makes 52 calls (~13 kernels, 3 bmm) per layer where the chunk path
        makes ~94 (~38 kernels). The decode blocks sit in the front regions of the window buffers, so
        [blocks | far window] is one product with the n_local-rotated query and every value one more; the
        softmax scale is folded into the query's RoPE tables. For T = 1 the far window columns are exactly
        [0, f_end) and the local ones [f_end, W) (l0 == f_end) and none is masked."""
        hkv, d = self.hkv, self.d
        hq = q.shape[1]
        g, f = hq // hkv, plan.f_end
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
        # columns [blocks (m) | far window (f) | local window]: keys without RoPE for the first two parts
        keys, start = self.wkeys.with_front(), self.wkeys.front - m
        n_all = m + self.wkeys.n
        lg = _workspace(hkv * g * n_all, q.dtype, q.device).view(hkv, g, n_all)
        q_glob, q_loc = rot[0, :hq].view(hkv, g, d), rot[1, :hq].view(hkv, g, d)
        if m + f:
            torch.bmm(q_glob, keys[0, :, :, start : start + m + f], out=lg[..., : m + f])
            if pad is not None:
                lg[..., :m].add_(pad[:, :, 0])
        torch.bmm(q_loc, keys[1, :, :, start + m + f :], out=lg[..., m + f :])
        p = torch.ops.aten._softmax.out(lg, -1, False, out=lg)
        out = torch.bmm(p, self.wv.with_front()[:, start:])  # (Hkv, G, D)
        self.wscore.get().add_(p[..., m:].sum(1).T)  # attention each window key received
        self._advance(1)
        return out.view(1, hq, d)

    def _uses_blocks(self) -> bool:
        """Whether this step attends memory blocks (there are some and the layer's top-k is not 0)."""
        return bool(self.num_blocks) and self.cfg.policy.topk_for(self.layer, self.num_blocks) > 0

    def _advance(self, t: int) -> None:
        """t tokens were appended: pack the full blocks that left the local window."""
        self.n_tokens += t
        nf = max(0, (self.wkeys.n - self.n_sinks + 1 - self.cfg.n_local) // self.cfg.block_size)
        if nf:
            self._pack(nf)

    def _retrieve(self, q_glob: torch.Tensor):
        """Blocks this chunk attends to: keys (Hkv, 1 or G, D, M) column-major, values (Hkv, 1 or G, M, D),
        and an (Hkv, 1 or G, 1, M) additive 0 / -inf over padding (None if every head has M picks).

        A prefill chunk selects with its mean query (and, sticky, remembers the pick) and gathers its
        picks through the LRU device cache; a decode step selects top-k for its query (union the sticky
        pick) every `reselect_every` steps into the decode working set and reuses it in between."""
        pol = self.cfg.policy
        t, hq, d = q_glob.shape
        if t == 1 and self.dec_slots is not None and self.dec_age < pol.reselect_every:
            if self.dec is None:  # restored from a snapshot: refill the same slots
                self._refill(None)
            self.dec_age += 1
            return self._decode_blocks()
        nb = self.num_blocks
        scores = block_scores(q_glob.mean(0), self.reprs.get().to(q_glob.dtype), pol.repr_mode)  # (Hq, NB)
        if self.record_scores:  # probes (bench/kv_memory_probe.py) read the last step's block scores
            self.last_scores = scores
        extra = None
        if pol.sticky and t == 1 and self.sticky is not None:
            extra = torch.zeros(hq, nb, dtype=torch.bool, device=q_glob.device)
            extra[:, : self.sticky.shape[1]] = self.sticky
        idx, valid, mask = select_blocks(scores, pol.topk_for(self.layer, nb), pol.granularity, self.hkv, extra,
                                         pol.next_blocks)
        if t > 1 and pol.sticky:
            self.sticky = mask
        counts = mask.sum(0)
        self.sel_count.buf[:nb].add_(counts)
        self.selected_total += int(counts.sum())
        if t > 1:
            self.dec = self.dec_slots = None
            return self._gather(idx, valid)
        if pol.granularity == "q_head":
            self.dec_slots = torch.where(valid, idx, -1)
        self._refill(mask)
        self.dec_age = 1
        return self._decode_blocks()

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

    def _stored(self) -> tuple[QuantizedBlocks, QuantizedBlocks]:
        """The memory tier's keys and values (views of the store)."""
        return tuple(QuantizedBlocks(kind, *(self.store[f"{x}_{part}"].get() for part in _PARTS))
                     for x, kind in zip("kv", self.cfg.kinds(self.layer)))

    def _load_block_heads(self, blocks: torch.Tensor, heads: torch.Tensor):
        """(n, bs, D) keys and values of block blocks[i] in KV head heads[i], from the memory tier."""
        (kq, vq), cfg = self._stored(), self.cfg
        return (dequantize_block_heads(kq, blocks, heads, per_channel=True, group=cfg.key_group),
                dequantize_block_heads(vq, blocks, heads, per_channel=False, group=cfg.value_group))

    def _load_blocks(self, idx: torch.Tensor):
        (kq, vq), cfg = self._stored(), self.cfg
        return (dequantize(kq, idx, per_channel=True, group=cfg.key_group),
                dequantize(vq, idx, per_channel=False, group=cfg.value_group))

    # ------------------------------------------------------------------ state updates
    def _pack(self, nf: int) -> None:
        """Move the nf oldest full blocks of the buffer into the memory tier."""
        cfg, bs, hkv, d = self.cfg, self.cfg.block_size, self.hkv, self.d
        n, n_s = nf * bs, self.n_sinks
        start = self.buf_start
        kb = self.wkeys.get()[0, :, :, n_s : n_s + n].reshape(hkv, d, nf, bs).permute(2, 0, 3, 1)  # (nf, Hkv, bs, D)
        vb = self.wv.get()[:, n_s : n_s + n].reshape(hkv, nf, bs, d).transpose(0, 1)  # (nf, Hkv, bs, D)
        sc = self.wscore.get()[n_s : n_s + n].reshape(nf, bs, hkv).transpose(1, 2)  # (nf, Hkv, bs)
        self.reprs.append(self._representatives(kb, sc).permute(1, 3, 0, 2))
        ck, cv = cfg.kinds(self.layer)
        top = sc.topk(max(cfg.exact_keys, cfg.exact_values), dim=-1).indices  # most-attended tokens first
        kq = quantize(kb, ck, per_channel=True, group=cfg.key_group, exact_idx=top[..., : cfg.exact_keys])
        vq = quantize(vb, cv, per_channel=False, group=cfg.value_group, exact_idx=top[..., : cfg.exact_values])
        for x, qb in (("k", kq), ("v", vq)):
            for part, t in zip(_PARTS, (qb.data, qb.scale, qb.minimum, qb.exact, qb.exact_idx)):
                if t is not None:
                    self.store[f"{x}_{part}"].append(t)
        dev = kb.device
        self.block_pos.append(start + bs * torch.arange(nf, device=dev))
        self.sel_count.append(torch.zeros(nf, dtype=torch.long, device=dev))
        for r in (self.wkeys, self.wv, self.wscore):
            r.drop(n_s, n)
        self.dec_age = self.cfg.policy.reselect_every  # those tokens left the window: select afresh next step
        if cfg.budget_bytes is not None:
            self.enforce_budget(cfg.budget_bytes // self.num_layers)

    def _representatives(self, kb: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        """(nf, Hkv, R, D) from keys kb (nf, Hkv, bs, D) and attention received sc (nf, Hkv, bs)."""
        mode = self.cfg.policy.repr_mode
        if mode == "quest":
            return torch.stack((kb.amin(2), kb.amax(2)), dim=2)
        top = sc.topk(self.cfg.repr_topk, dim=-1).indices  # (nf, Hkv, r)
        keys = kb.gather(2, top[..., None].expand(-1, -1, -1, kb.shape[-1]))  # (nf, Hkv, r, D)
        return keys.mean(2, keepdim=True) if mode == "mean" else keys

    def enforce_budget(self, budget: int) -> int:
        """Drop least-often-selected blocks until the memory tier fits `budget` bytes; returns #dropped."""
        nb = self.num_blocks
        if nb == 0:
            return 0
        drop = blocks_to_evict(self.sel_count.get(), self.bytes_per_block(), self.memory_tier_bytes(), budget)
        if drop.numel() == 0:
            return 0
        keep = torch.ones(nb, dtype=torch.bool, device=drop.device)
        keep[drop] = False
        keep_idx = keep.nonzero().squeeze(1)
        for r in (*self.store.values(), self.reprs, self.block_pos, self.sel_count):
            r.keep(keep_idx)
        if self.sticky is not None:
            self.sticky = self.sticky[:, keep_idx[keep_idx < self.sticky.shape[1]]]
        self.cache_k = self.cache_v = self.cache_ids = self.cache_used = None  # ids changed: refill
        self.dec = self.dec_slots = None  # and select again
        self.evicted_total += int(drop.numel())
        return int(drop.numel())

    # ------------------------------------------------------------------ snapshots
    def _row_fields(self):
        return [(n, getattr(self, n)) for n in ("wscore", "reprs", "block_pos", "sel_count")]

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


class SequenceMemory:
    """The KV memory of one sequence (or session): one LayerMemory per layer plus its token ids."""

    def __init__(self, cfg: KVMemoryConfig, num_layers: int, num_kv_heads: int, head_dim: int):
        self.cfg = cfg
        plans = _PlanCache()
        self.layers = [LayerMemory(cfg, i, num_kv_heads, head_dim, num_layers, plans) for i in range(num_layers)]
        self.token_ids: list[int] = []

    @property
    def num_tokens(self) -> int:
        return self.layers[0].n_tokens

    def tier_bytes(self) -> dict[str, int]:
        return {"device": sum(m.device_tier_bytes() for m in self.layers),
                "memory": sum(m.memory_tier_bytes() for m in self.layers)}

    def blocks_retrieved(self) -> int:
        return sum(m.retrieved_total for m in self.layers)


def reference_attention(q, k, v, inv_freq, scale, n_init, n_local):
    """Dense attention under the KV-memory position scheme, for tests: every key attended.

    q (T, Hq, D), k/v (T, Hkv, D) for ONE sequence from position 0, computed in float64.
    A key at distance d from an engaged query (p >= n_init + n_local) sits at min(d, n_local).
    """
    q, k, v = q.double(), k.double(), v.double()
    t, hq, d = q.shape
    g = hq // k.shape[1]
    pos = torch.arange(t)
    inv = inv_freq.double()
    ql, kl = rotate(q, pos, inv), rotate(k, pos, inv)
    qn = rotate(q, torch.full_like(pos, n_local), inv)
    kr = k.repeat_interleave(g, dim=1)
    klr = kl.repeat_interleave(g, dim=1)
    s_loc = torch.einsum("thd,shd->hts", ql, klr)
    s_far = torch.einsum("thd,shd->hts", qn, kr)
    dist = pos[:, None] - pos[None, :]
    far = (pos[:, None] >= n_init + n_local) & (dist >= n_local)
    s = torch.where(far, s_far, s_loc).masked_fill(dist < 0, float("-inf")) * scale
    p = torch.softmax(s, -1)
    return torch.einsum("hts,shd->thd", p, v.repeat_interleave(g, dim=1))


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
