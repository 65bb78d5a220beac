"""KIVI-style asymmetric KV quantization (Liu et al. 2024, "KIVI: a tuning-free asymmetric 2bit
quantization for KV cache"): keys per channel, values per token, groups of 32, `scale=(max-min)/(2^b-1)`.

Input layout is the KV block layout `(N, BS, H, D)` (N blocks of BS tokens; BS=128 for InfLLM
memory blocks). Everything in a `QuantizedKV` is indexed by the leading block dimension, so a
memory tier stores, moves and selects blocks with plain indexing (`qkv.select(ids)`):

    data   uint8  (N, BS, H, D)        bits=8
           uint8  (N, BS, H, D//2)     bits=4, two channels per byte: low nibble = channel 2j, high = 2j+1
    key   ("k", per channel, groups of `group` tokens):    scale, zero fp32 (N, ceil(BS/group), H, D)
    value ("v", per token, groups of `group` channels):    scale, zero fp32 (N, BS, H, ceil(D/group))
    x ~= code * scale + zero,  code = floor((x - zero) / scale + 0.5) in [0, 2^bits - 1]

Metadata is fp32 by default (not fp16 as in KIVI): 0.25 B/element extra, so int4 blocks take 0.75 B/element
(5.3x smaller than fp32) and the error bound |x - x_hat| <= scale/2 holds without fp16 rounding
fix-ups or overflow for large activations. `meta_dtype=torch.float16` stores scale/zero in fp16 (the KV
memory tier uses it: int4 with groups of 64 then takes 0.28x of fp16 KV per token, fp32 metadata 0.31x);
codes are then computed against the rounded scale/zero that dequantization reads.

    quantize_kv / dequantize_kv         dispatch (CUDA -> Triton, else torch)
    quantize_kv_ref / dequantize_kv_ref torch (vectorized; the reference and the CPU path)
    gather_dequant_ref                  dequantize only selected tokens of selected heads (CPU path of
                                        block-sparse attention)
"""

from dataclasses import dataclass

import torch

from ._common import check, lazy_jit, tl, triton, use_triton

__all__ = [
    "QuantizedKV",
    "quantize_kv",
    "dequantize_kv",
    "quantize_kv_ref",
    "dequantize_kv_ref",
    "quantize_kv_triton",
    "dequantize_kv_triton",
    "gather_dequant_ref",
    "dequant_blocks_head",
    "dequant_block_heads",
    "dequant_blocks",
]


@dataclass(slots=True)
class QuantizedKV:
    data: torch.Tensor  # uint8 (N, BS, H, D) or (N, BS, H, D//2)
    scale: torch.Tensor  # fp32 (or meta_dtype), see module docstring
    zero: torch.Tensor  # same dtype and shape as scale
    kind: str  # "k" (per-channel groups over tokens) | "v" (per-token groups over channels)
    bits: int  # 8 | 4
    group: int  # 32
    head_dim: int  # D (data's last dim is D//2 when bits == 4)

    def __post_init__(self):
        assert self.kind in ("k", "v"), self.kind
        assert self.bits in (4, 8), self.bits
        assert self.data.dtype == torch.uint8 and self.data.dim() == 4
        assert self.data.shape[-1] == (self.head_dim if self.bits == 8 else self.head_dim // 2)

    @property
    def shape(self):
        """Logical (N, BS, H, D) of the dequantized tensor."""
        N, BS, H, _ = self.data.shape
        return (N, BS, H, self.head_dim)

    @property
    def block_size(self) -> int:
        return self.data.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.data.shape[2]

    @property
    def device(self):
        return self.data.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero))

    def select(self, ids: torch.Tensor) -> "QuantizedKV":
        """Blocks `ids` (1-D) as a new QuantizedKV (copies)."""
        ids = ids.long()
        return QuantizedKV(self.data[ids], self.scale[ids], self.zero[ids], self.kind, self.bits,
                           self.group, self.head_dim)

    def to(self, device) -> "QuantizedKV":
        return QuantizedKV(self.data.to(device), self.scale.to(device), self.zero.to(device), self.kind,
                           self.bits, self.group, self.head_dim)


def _check_x(x, kind, bits, group, meta_dtype=torch.float32):
    check(meta_dtype in (torch.float32, torch.float16, torch.bfloat16), f"meta_dtype {meta_dtype}")
    check(x.dim() == 4, f"expected (N, BS, H, D), got {tuple(x.shape)}")
    check(kind in ("k", "v"), f"kind must be 'k' or 'v', got {kind!r}")
    check(bits in (4, 8), f"bits must be 4 or 8, got {bits}")
    check(group >= 2 and group % 2 == 0, "group must be even")
    check(bits == 8 or x.shape[3] % 2 == 0, "int4 packing needs an even head_dim")
    check(x.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64), f"dtype {x.dtype}")


def _pad_to(x, dim, mult):
    """Pad `dim` up to a multiple of `mult` by repeating the last slice (min/max unchanged)."""
    n = x.shape[dim]
    r = (-n) % mult
    if r == 0:
        return x
    last = x.narrow(dim, n - 1, 1)
    return torch.cat([x, last.expand(*[r if i == dim else s for i, s in enumerate(last.shape)])], dim)


# ----------------------------------------------------------------------------- torch
def quantize_kv_ref(x: torch.Tensor, kind: str, bits: int = 8, group: int = 32,
                    meta_dtype: torch.dtype = torch.float32) -> QuantizedKV:
    _check_x(x, kind, bits, group, meta_dtype)
    N, BS, H, D = x.shape
    qmax = (1 << bits) - 1
    xf = x.float()
    if kind == "k":  # per channel: groups of `group` tokens
        xp = _pad_to(xf, 1, group)
        ng = xp.shape[1] // group
        xg = xp.view(N, ng, group, H, D)  # (N, ng, g, H, D)
        mn, mx = xg.amin(2), xg.amax(2)  # (N, ng, H, D)
        mn = mn.to(meta_dtype).float()  # codes against the stored metadata (no-op for fp32)
        scale = ((mx - mn) / qmax).to(meta_dtype).float()
        codes = torch.floor((xg - mn[:, :, None]) / torch.where(scale > 0, scale, 1.0)[:, :, None] + 0.5)
        codes = codes.clamp_(0, qmax).view(N, ng * group, H, D)[:, :BS]
    else:  # per token: groups of `group` channels
        xp = _pad_to(xf, 3, group)
        ng = xp.shape[3] // group
        xg = xp.view(N, BS, H, ng, group)  # (N, BS, H, ng, g)
        mn, mx = xg.amin(4), xg.amax(4)  # (N, BS, H, ng)
        mn = mn.to(meta_dtype).float()
        scale = ((mx - mn) / qmax).to(meta_dtype).float()
        codes = torch.floor((xg - mn[..., None]) / torch.where(scale > 0, scale, 1.0)[..., None] + 0.5)
        codes = codes.clamp_(0, qmax).view(N, BS, H, ng * group)[..., :D]
    codes = codes.to(torch.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)  # (N, BS, H, D//2)
    return QuantizedKV(codes.contiguous(), scale.to(meta_dtype).contiguous(), mn.to(meta_dtype).contiguous(),
                       kind, bits, group, D)


def _unpack(data: torch.Tensor, bits: int, D: int) -> torch.Tensor:
    if bits == 8:
        return data
    lo, hi = data & 0xF, data >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)[..., :D]  # (..., D)


def dequantize_kv_ref(q: QuantizedKV, dtype=torch.float32) -> torch.Tensor:
    N, BS, H, D = q.shape
    codes = _unpack(q.data, q.bits, D).float()
    if q.kind == "k":
        sc = q.scale.float().repeat_interleave(q.group, dim=1)[:, :BS]  # (N, BS, H, D)
        zp = q.zero.float().repeat_interleave(q.group, dim=1)[:, :BS]
    else:
        sc = q.scale.float().repeat_interleave(q.group, dim=3)[..., :D]
        zp = q.zero.float().repeat_interleave(q.group, dim=3)[..., :D]
    return (codes * sc + zp).to(dtype)


def gather_dequant_ref(q: QuantizedKV, tok: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """fp32 rows x[tok // BS, tok % BS, head, :] for broadcastable int64 index tensors `tok`, `head`.
    Only the gathered rows are unpacked (block-sparse attention reads the selected blocks only)."""
    N, BS, H, D = q.shape
    codes = _unpack(q.data.view(N * BS, H, -1)[tok, head], q.bits, D).float()  # (..., D)
    if q.kind == "k":
        g = (tok // BS) * q.scale.shape[1] + (tok % BS) // q.group
        sc = q.scale.view(-1, H, D)[g, head].float()  # (..., D)
        zp = q.zero.view(-1, H, D)[g, head].float()
    else:
        sc = q.scale.view(N * BS, H, -1)[tok, head].float().repeat_interleave(q.group, dim=-1)[..., :D]
        zp = q.zero.view(N * BS, H, -1)[tok, head].float().repeat_interleave(q.group, dim=-1)[..., :D]
    return codes * sc + zp


# ----------------------------------------------------------------------------- triton
def _quant_kernel(x_ptr, d_ptr, s_ptr, z_ptr,
                  BS, H, D, NG,
                  sxn, sxt, sxh, sxd,
                  IS_KEY: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                  ROWS: tl.constexpr, COLS: tl.constexpr):
    # Program (n, r, h): keys r = token group (tile GROUP tokens x all channels, reduce over tokens);
    # values r = token (tile all channel groups x GROUP channels, reduce over channels).
    # Channels are processed as even / odd halves so int4 pairs (2j, 2j+1) pack in registers.
    n = tl.program_id(0)
    r = tl.program_id(1)
    h = tl.program_id(2)
    QMAX: tl.constexpr = (1 << BITS) - 1
    i = tl.arange(0, ROWS)[:, None]
    j = tl.arange(0, COLS)[None, :]
    if IS_KEY:
        t = r * GROUP + i  # (ROWS, 1) tokens of this group, ROWS == GROUP
        d0 = 2 * j  # (1, COLS) even channels
        tmask = (i < GROUP) & (t < BS)
    else:
        t = r + 0 * i
        d0 = i * GROUP + 2 * j  # (ROWS channel groups, COLS = GROUP // 2 pairs)
        tmask = (2 * j < GROUP) & (t < BS)
    m0 = tmask & (d0 < D)
    m1 = tmask & (d0 + 1 < D)
    base = x_ptr + n * sxn + t * sxt + h * sxh
    x0 = tl.load(base + d0 * sxd, mask=m0, other=0.0).to(tl.float32)
    x1 = tl.load(base + (d0 + 1) * sxd, mask=m1, other=0.0).to(tl.float32)
    if IS_KEY:  # per channel: reduce over the token axis (0)
        mn0 = tl.min(tl.where(m0, x0, float("inf")), axis=0)[None, :]
        mx0 = tl.max(tl.where(m0, x0, float("-inf")), axis=0)[None, :]
        mn1 = tl.min(tl.where(m1, x1, float("inf")), axis=0)[None, :]
        mx1 = tl.max(tl.where(m1, x1, float("-inf")), axis=0)[None, :]
    else:  # per token: reduce over the channels of a group (axis 1, both halves)
        mn0 = tl.minimum(tl.min(tl.where(m0, x0, float("inf")), axis=1),
                         tl.min(tl.where(m1, x1, float("inf")), axis=1))[:, None]
        mx0 = tl.maximum(tl.max(tl.where(m0, x0, float("-inf")), axis=1),
                         tl.max(tl.where(m1, x1, float("-inf")), axis=1))[:, None]
        mn1 = mn0
        mx1 = mx0
    # round to the metadata dtype first so codes match what dequantization reads (no-op for fp32)
    MT = s_ptr.dtype.element_ty
    mn0 = mn0.to(MT).to(tl.float32)
    mn1 = mn1.to(MT).to(tl.float32)
    sc0 = ((mx0 - mn0) / QMAX).to(MT).to(tl.float32)
    sc1 = ((mx1 - mn1) / QMAX).to(MT).to(tl.float32)
    c0 = tl.floor((x0 - mn0) / tl.where(sc0 > 0, sc0, 1.0) + 0.5)
    c1 = tl.floor((x1 - mn1) / tl.where(sc1 > 0, sc1, 1.0) + 0.5)
    c0 = tl.minimum(tl.maximum(c0, 0.0), QMAX).to(tl.uint8)
    c1 = tl.minimum(tl.maximum(c1, 0.0), QMAX).to(tl.uint8)
    # data: contiguous (N, BS, H, DP)
    row = (n * BS + t) * H + h
    if BITS == 8:
        tl.store(d_ptr + row * D + d0, c0, mask=m0)
        tl.store(d_ptr + row * D + d0 + 1, c1, mask=m1)
    else:
        tl.store(d_ptr + row * (D // 2) + d0 // 2, c0 | (c1 << 4), mask=m0)
    # metadata: keys (N, NG, H, D) indexed by channel, values (N, BS, H, NG) indexed by group
    if IS_KEY:
        mrow = ((n * NG + r) * H + h) * D
        cm0 = (j < COLS) & (d0 < D)
        cm1 = (j < COLS) & (d0 + 1 < D)
        tl.store(s_ptr + mrow + d0, sc0, mask=cm0)
        tl.store(z_ptr + mrow + d0, mn0, mask=cm0)
        tl.store(s_ptr + mrow + d0 + 1, sc1, mask=cm1)
        tl.store(z_ptr + mrow + d0 + 1, mn1, mask=cm1)
    else:
        gm = i < NG
        moff = ((n * BS + r) * H + h) * NG + i
        tl.store(s_ptr + moff, sc0, mask=gm)
        tl.store(z_ptr + moff, mn0, mask=gm)


_quant_jit = lazy_jit(_quant_kernel)


def quantize_kv_triton(x: torch.Tensor, kind: str, bits: int = 8, group: int = 32,
                       meta_dtype: torch.dtype = torch.float32) -> QuantizedKV:
    _check_x(x, kind, bits, group, meta_dtype)
    check(x.dtype != torch.float64, "Triton path takes fp32/fp16/bf16")
    N, BS, H, D = x.shape
    ngk = triton.cdiv(BS, group)
    ngv = triton.cdiv(D, group)
    DP = D if bits == 8 else D // 2
    data = torch.empty(N, BS, H, DP, dtype=torch.uint8, device=x.device)
    mshape = (N, ngk, H, D) if kind == "k" else (N, BS, H, ngv)
    scale = torch.empty(mshape, dtype=meta_dtype, device=x.device)
    zero = torch.empty(mshape, dtype=meta_dtype, device=x.device)
    if kind == "k":
        grid, rows, cols, ng = (N, ngk, H), group, triton.next_power_of_2(triton.cdiv(D, 2)), ngk
    else:
        grid, rows, cols, ng = (N, BS, H), triton.next_power_of_2(ngv), group // 2, ngv
    _quant_jit()[grid](x, data, scale, zero, BS, H, D, ng, *x.stride(),
                       IS_KEY=kind == "k", BITS=bits, GROUP=group, ROWS=rows, COLS=cols)
    return QuantizedKV(data, scale, zero, kind, bits, group, D)


def _dequant_kernel(d_ptr, s_ptr, z_ptr, o_ptr, BS, H, D, NG,
                    IS_KEY: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program per (n, t, h) row of D channels; all tensors contiguous
    row = tl.program_id(0)  # (n * BS + t) * H + h
    h = row % H
    nt = row // H
    t = nt % BS
    n = nt // BS
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    if BITS == 8:
        c = tl.load(d_ptr + row * D + d, mask=dm, other=0).to(tl.float32)
    else:
        byte = tl.load(d_ptr + row * (D // 2) + d // 2, mask=dm, other=0)
        c = ((byte >> ((d % 2) * 4).to(tl.uint8)) & 0xF).to(tl.float32)
    if IS_KEY:
        moff = ((n * NG + t // GROUP) * H + h) * D + d
    else:
        moff = row * NG + d // GROUP
    sc = tl.load(s_ptr + moff, mask=dm, other=0.0).to(tl.float32)
    zp = tl.load(z_ptr + moff, mask=dm, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * D + d, (c * sc + zp).to(o_ptr.dtype.element_ty), mask=dm)


_dequant_jit = lazy_jit(_dequant_kernel)


def dequantize_kv_triton(q: QuantizedKV, dtype=torch.float32) -> torch.Tensor:
    N, BS, H, D = q.shape
    for t in (q.data, q.scale, q.zero):
        check(t.is_contiguous(), "QuantizedKV tensors must be contiguous")
    out = torch.empty(N, BS, H, D, dtype=dtype, device=q.device)
    ng = q.scale.shape[1] if q.kind == "k" else q.scale.shape[3]
    _dequant_jit()[(N * BS * H,)](q.data, q.scale, q.zero, out, BS, H, D, ng, IS_KEY=q.kind == "k",
                                  BITS=q.bits, GROUP=q.group, BLOCK_D=triton.next_power_of_2(D))
    return out


# ----------------------------------------------------------------------------- dispatch
def quantize_kv(x: torch.Tensor, kind: str, bits: int = 8, group: int = 32,
                meta_dtype: torch.dtype = torch.float32) -> QuantizedKV:
    """KIVI quantization of KV blocks `x (N, BS, H, D)`; kind "k" per-channel, "v" per-token;
    scale/zero stored as `meta_dtype`."""
    if use_triton(x):
        return quantize_kv_triton(x, kind, bits, group, meta_dtype)
    return quantize_kv_ref(x, kind, bits, group, meta_dtype)


def dequantize_kv(q: QuantizedKV, dtype=torch.float32) -> torch.Tensor:
    """(N, BS, H, D) tensor of `dtype` from a QuantizedKV."""
    if use_triton(q.data):
        return dequantize_kv_triton(q, dtype)
    return dequantize_kv_ref(q, dtype)


def dequant_block_heads(q: QuantizedKV, ids: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """fp32 (n, BS, D): block ids[i] of KV head heads[i], dequantized, for n (block, head) pairs.
    One advanced-index gather per tensor + broadcast scale/zero: the CPU path of block-sparse attention
    over a quantized tier, and the KV memory's decode refills (only the heads that picked a block)."""
    N, BS, H, D = q.shape
    ids, heads = ids.long(), heads.long()
    n = ids.numel()
    c = _unpack(q.data[ids, :, heads], q.bits, D).float()  # (n, BS, D)
    sc, zp = q.scale[ids, :, heads].float(), q.zero[ids, :, heads].float()
    if q.kind == "k":  # sc (n, ceil(BS/g), D)
        if BS % q.group == 0:
            ng = BS // q.group
            return torch.addcmul(zp.view(n, ng, 1, D), c.view(n, ng, q.group, D), sc.view(n, ng, 1, D)).view(n, BS, D)
        sc = sc.repeat_interleave(q.group, dim=1)[:, :BS]
        zp = zp.repeat_interleave(q.group, dim=1)[:, :BS]
        return c * sc + zp
    # values: sc (n, BS, ceil(D/g))
    if D % q.group == 0:
        return (c.view(-1, q.group) * sc.reshape(-1, 1)).add_(zp.reshape(-1, 1)).view(n, BS, D)
    sc = sc.repeat_interleave(q.group, dim=2)[..., :D]
    zp = zp.repeat_interleave(q.group, dim=2)[..., :D]
    return c * sc + zp


def dequant_blocks_head(q: QuantizedKV, ids: torch.Tensor, head: int) -> torch.Tensor:
    """fp32 (len(ids), BS, D): blocks `ids` of one KV head, dequantized."""
    return dequant_block_heads(q, ids, torch.full_like(ids, head, dtype=torch.long))


def dequant_blocks(q: QuantizedKV, ids: torch.Tensor) -> torch.Tensor:
    """fp32 (len(ids), BS, H, D): whole blocks (all heads), dequantized with broadcast scale/zero
    after one contiguous index_select per tensor."""
    N, BS, H, D = q.shape
    ids = ids.long()
    n = ids.numel()
    c = _unpack(q.data.index_select(0, ids), q.bits, D).float()  # (n, BS, H, D)
    sc, zp = q.scale.index_select(0, ids).float(), q.zero.index_select(0, ids).float()
    if q.kind == "k" and BS % q.group == 0:
        ng = BS // q.group
        return torch.addcmul(zp.view(n, ng, 1, H, D), c.view(n, ng, q.group, H, D),
                             sc.view(n, ng, 1, H, D)).view(n, BS, H, D)
    if q.kind == "v" and D % q.group == 0:
        # 2-D (rows, group) * (rows, 1): measured 1.6x faster than a 5-D broadcast addcmul
        return (c.view(-1, q.group) * sc.view(-1, 1)).add_(zp.view(-1, 1)).view(n, BS, H, D)
    dim = 1 if q.kind == "k" else 3
    sc = sc.repeat_interleave(q.group, dim=dim).narrow(dim, 0, BS if q.kind == "k" else D)
    zp = zp.repeat_interleave(q.group, dim=dim).narrow(dim, 0, BS if q.kind == "k" else D)
    return c * sc + zp
