"""Loading memory-layer checkpoints (issue 16): value tables memory-mapped, tensors validated.

A value table (n_keys**2 rows) can be many GB, so it is never read into RAM at load: its byte range
is located in the safetensors header (8-byte little-endian header length, JSON header with
`data_offsets` relative to the end of the header) and mapped copy-on-write with numpy.memmap. Pages
are read on first touch by a lookup; the table keeps its stored dtype (fp32 / bf16 / fp16 / int8; an
int8 table's per-row `…values.scales` are mapped the same way, see runtime/ffn.py).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .errors import UnsupportedModelError
from .ffn import (
    is_scales_name,
    is_values_name,
    memory_weight_shapes,
    optional_memory_shapes,
    scales_name,
    values_name,
)

# safetensors dtype -> (numpy dtype to map the bytes as, torch dtype to view them as)
SAFETENSORS_DTYPES = {
    "F32": (np.float32, torch.float32),
    "F16": (np.float16, torch.float16),
    "BF16": (np.uint16, torch.bfloat16),  # numpy has no bfloat16: map 16-bit words, view as bf16
    "I8": (np.int8, torch.int8),  # int8 value tables (with per-row scales)
}


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset where tensor data begins)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def mmap_tensor(path: Path, name: str, entry: dict, data_start: int) -> torch.Tensor:
    dt = entry["dtype"]
    if dt not in SAFETENSORS_DTYPES:
        raise UnsupportedModelError(f"{path}: value table {name} has dtype {dt}; supported: {sorted(SAFETENSORS_DTYPES)}")
    np_dt, torch_dt = SAFETENSORS_DTYPES[dt]
    b, e = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if e - b != int(np.prod(shape)) * np.dtype(np_dt).itemsize:
        raise UnsupportedModelError(f"{path}: {name} byte range [{b}, {e}) does not match shape {shape} {dt}")
    if e == b:
        return torch.empty(shape, dtype=torch_dt)
    # mode "c": copy-on-write private mapping, writable for torch (no warning) but never written back
    arr = np.memmap(path, dtype=np_dt, mode="c", offset=data_start + b, shape=shape)
    return torch.from_numpy(arr).view(torch_dt)


def read_safetensors_file(f: Path, weights: dict[str, torch.Tensor]) -> None:
    """All tensors of one file into `weights`: value tables memory-mapped, the rest read as fp32."""
    from safetensors import safe_open

    header, data_start = safetensors_header(f)
    tables = [n for n in header if is_values_name(n) or is_scales_name(n)]
    for n in tables:
        weights[n] = mmap_tensor(f, n, header[n], data_start)
    if len(tables) == len(header):
        return
    with safe_open(str(f), framework="pt") as sf:
        for name in sf.keys():
            if name not in tables:
                weights[name] = sf.get_tensor(name).to(torch.float32)


def memory_shapes(c: ModelConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(required, optional) memory tensors with shapes; empty for a dense model."""
    req: dict[str, tuple[int, ...]] = {}
    opt: dict[str, tuple[int, ...]] = {}
    mc = c.memory_layers
    if mc is None:
        return req, opt
    for i in mc.layers:
        req |= memory_weight_shapes(mc, c.hidden_size, i)
        opt |= optional_memory_shapes(mc, c.hidden_size, i)
    return req, opt


def check_memory_weights(c: ModelConfig, weights: dict[str, torch.Tensor], source: str) -> None:
    """Errors name the tensor and the shape expected from config.json's memory_layers."""
    mc = c.memory_layers
    if mc is None:
        return
    req, opt = memory_shapes(c)
    cfg_txt = (f"memory_layers n_keys={mc.n_keys}, heads={mc.heads}, k_dim={mc.k_dim}, v_dim={mc.v_dim}, "
               f"hidden_size={c.hidden_size}")
    for name, shape in req.items():
        if name not in weights:
            raise UnsupportedModelError(f"{source}: memory tensor {name} is missing; expected shape {shape} "
                                        f"({cfg_txt})")
    for name, shape in (req | opt).items():
        if name not in weights:
            continue
        got = tuple(weights[name].shape)
        if got == shape:
            continue
        why = ""
        if is_values_name(name) and len(got) == 2 and got[0] != mc.num_slots:
            why = f": rows must be n_keys**2 = {mc.n_keys}**2 = {mc.num_slots}"
        raise UnsupportedModelError(f"{source}: memory tensor {name} has shape {got}; expected {shape}{why} "
                                    f"({cfg_txt})")
    for vname in sorted({values_name(mc, i) for i in mc.layers}):
        sname = scales_name(vname)
        is_int8 = weights[vname].dtype == torch.int8
        if is_int8 and sname not in weights:
            raise UnsupportedModelError(f"{source}: value table {vname} is int8 but its per-row scales {sname} are "
                                        f"missing; expected shape {(mc.num_slots,)} float32")
        if not is_int8 and sname in weights:
            raise UnsupportedModelError(f"{source}: {sname} given but {vname} is {weights[vname].dtype}; per-row "
                                        "scales go with an int8 (I8) table only")
        if is_int8 and not weights[sname].is_floating_point():
            raise UnsupportedModelError(f"{source}: {sname} is {weights[sname].dtype}; expected float32")
    if mc.v_dim != c.hidden_size:
        for i in mc.layers:
            vp = f"model.layers.{i}.memory.value_proj.weight"
            if vp not in weights:
                raise UnsupportedModelError(
                    f"{source}: memory tensor {vp} is missing; it may be absent (identity) only when v_dim "
                    f"({mc.v_dim}) == hidden_size ({c.hidden_size}); expected shape {(c.hidden_size, mc.v_dim)}")
    if mc.mode == "replace":
        for i in mc.layers:
            mlp = sorted(n for n in weights if n.startswith(f"model.layers.{i}.mlp."))
            if mlp:
                raise UnsupportedModelError(
                    f"{source}: layer {i} is a memory layer in 'replace' mode but has MLP tensors {mlp[:3]}; "
                    "drop them or use mode 'parallel'")
