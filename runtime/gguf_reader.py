"""GGUF specifics: metadata -> ModelConfig, tensors -> fp32 HF-named weights (via the `gguf` package).

llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) reorders the rows of attn_q / attn_k of
llama-architecture models so that each head's rotary pairs are interleaved (x0,x1),(x2,x3)... as its
"normal" RoPE expects. HF checkpoints use the rotate-half layout (x_i pairs with x_{i+D/2}), so those rows
are permuted back here. Qwen2 GGUFs are not permuted (llama.cpp runs them with NeoX-style RoPE).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .errors import UnsupportedModelError

_GGUF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Quantization types dequantized (with gguf.quants, to fp32) and covered by tests.
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


# GGUF value types (gguf.constants.GGUFValueType) -> struct format; 8 = string, 9 = array.
_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NP = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}


@dataclass(slots=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # PyTorch order (outermost first); GGUF stores dims innermost-first
    qtype: object  # gguf.GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(slots=True)
class GGUFFile:
    path: Path
    metadata: dict
    tensors: list[GGUFTensor]


def open_gguf(path) -> GGUFFile:
    """Parse a GGUF header: metadata and tensor directory (the data stays on disk, memory-mapped later).

    Written here instead of using gguf.GGUFReader, which wraps every array element in numpy memmap views:
    it took 4.6 s (15 s with the CPU shared) for the default model's 98k tokenizer strings; this takes ~0.1 s.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    buf = path.read_bytes() if path.stat().st_size < (1 << 20) else _read_header_bytes(path)
    pos = 0

    def unpack(fmt):
        nonlocal pos
        v = struct.unpack_from(fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def string():
        nonlocal pos
        n = unpack("<Q")
        v = bytes(buf[pos : pos + n]).decode("utf-8", errors="replace")
        pos += n
        return v

    def value(vtype):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype == 9:
            itype, n = unpack("<I"), unpack("<Q")
            if itype in _NP:  # numeric arrays in one go
                arr = np.frombuffer(buf, dtype=_NP[itype], count=n, offset=pos)
                pos += arr.nbytes
                return arr.tolist()
            return [value(itype) for _ in range(n)]
        return unpack(_SCALAR[vtype])

    if unpack("<I") != 0x46554747:  # b"GGUF"
        raise UnsupportedModelError(f"{path} is not a GGUF file (bad magic)")
    version = unpack("<I")
    if version not in (2, 3):
        raise UnsupportedModelError(
            f"{path}: GGUF version {version} is not supported (supported: 2, 3; little-endian)"
        )
    n_tensors, n_kv = unpack("<Q"), unpack("<Q")
    md = {}
    for _ in range(n_kv):
        key = string()
        md[key] = value(unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [unpack("<Q") for _ in range(unpack("<I"))]
        infos.append((name, tuple(reversed(dims)), unpack("<I"), unpack("<Q")))
    align = int(md.get("general.alignment", 32))
    data_start = (pos + align - 1) // align * align
    tensors = []
    for name, shape, t, off in infos:
        try:
            qtype = GGMLQuantizationType(t)
        except ValueError:
            raise UnsupportedModelError(
                f"GGUF tensor {name!r} has unknown type id {t}; supported tensor types: {', '.join(SUPPORTED_TENSOR_TYPES)}"
            ) from None
        block, size = GGML_QUANT_SIZES[qtype]
        n = int(np.prod(shape)) if shape else 1
        tensors.append(GGUFTensor(name, shape, qtype, data_start + off, n // block * size))
    return GGUFFile(path, md, tensors)


def _read_header_bytes(path: Path) -> memoryview:
    # The header (metadata + tensor directory) is at the start; map the file instead of reading it whole.
    return memoryview(np.memmap(path, dtype=np.uint8, mode="r"))


def read_gguf_metadata(path) -> dict:
    return open_gguf(path).metadata


def hf_name(gguf_name: str) -> str:
    """GGUF tensor name -> HF name (raises UnsupportedModelError for tensors the model has no place for)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    raise UnsupportedModelError(
        f"GGUF tensor {gguf_name!r} has no counterpart in a Llama/Qwen2 model "
        f"(supported tensors: {', '.join(_GLOBAL_NAMES)}, blk.N.{{{', '.join(_BLOCK_NAMES)}}})"
    )


def config_from_gguf(
    md: dict, tensor_names: set[str], name: str = "", embd_rows: int | None = None
) -> ModelConfig:
    arch = md.get("general.architecture")
    if arch not in _GGUF_ARCH:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(_GGUF_ARCH)} "
            f"(HF: {', '.join(_GGUF_ARCH.values())}; Mistral GGUFs use 'llama')"
        )
    if "rope_freqs.weight" in tensor_names or md.get(f"{arch}.rope.scaling.type", "none") not in ("none",):
        raise UnsupportedModelError(
            "GGUF with RoPE scaling (rope_freqs tensor / rope.scaling.type) is not supported; "
            "load the model's HF directory instead (rope_scaling type llama3 is supported there)"
        )

    def key(k, default=None):
        return md.get(f"{arch}.{k}", default)

    def need(k):
        if f"{arch}.{k}" not in md:
            raise UnsupportedModelError(f"GGUF metadata lacks {arch}.{k}; cannot build the model config")
        return md[f"{arch}.{k}"]

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv = key("attention.head_count_kv", heads)
    if isinstance(kv, list):
        raise UnsupportedModelError("GGUF with per-layer kv head counts is not supported")
    head_dim = int(key("attention.key_length", hidden // heads))
    rot = int(key("rope.dimension_count", head_dim))
    if rot != head_dim:
        raise UnsupportedModelError(
            f"partial rotary (rope.dimension_count {rot} < head_dim {head_dim}) is not supported"
        )
    tokens = md.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size") or (len(tokens) if tokens is not None else None) or embd_rows
    if not vocab:
        raise UnsupportedModelError(
            "GGUF metadata gives no vocabulary size (vocab_size, tokens or token_embd)"
        )
    eos = [
        md[k]
        for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        if k in md
    ]
    return ModelConfig(
        architecture=_GGUF_ARCH[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(kv),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=None,
        max_position_embeddings=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=arch == "qwen2",
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(int(e) for e in eos)),
        name=name or md.get("general.name", ""),
    )


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's permute(): per head, rows (D/2, 2) interleaved -> (2, D/2) rotate-half."""
    rows = w.shape[0]
    # (n_head, D/2, 2, ...) -> (n_head, 2, D/2, ...)
    return (
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()
    )


def dequantize_tensor(t: GGUFTensor, data: np.ndarray) -> torch.Tensor:
    """One GGUF tensor (bytes of the memory-mapped file) -> fp32 torch tensor in PyTorch's (out, in) order."""
    from gguf.quants import dequantize, quant_shape_to_byte_shape

    qtype = t.qtype.name
    if qtype not in SUPPORTED_TENSOR_TYPES:
        raise UnsupportedModelError(
            f"GGUF tensor {t.name!r} has type {qtype}; supported tensor types: {', '.join(SUPPORTED_TENSOR_TYPES)}"
        )
    raw = data[t.offset : t.offset + t.nbytes].reshape(quant_shape_to_byte_shape(t.shape, t.qtype))
    arr = dequantize(raw, t.qtype)  # F32 comes back as a view of the read-only memory map: copy
    return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)).reshape(t.shape)


def load_gguf(path, *, progress: bool = True, q4_blocks: dict | None = None
              ) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """-> (config, fp32 weights with HF names, metadata) of a GGUF file. With `q4_blocks` (a dict), the
    raw blocks of every Q4_0/Q4_1 matrix are put there too by HF name (quant_int4.GGUFQ4Blocks: views
    of the memory map, no copy), for int4 linears that keep the file's codes."""
    f = open_gguf(path)
    md = f.metadata
    by_name = {t.name: t for t in f.tensors}
    for t in f.tensors:  # check types before spending time dequantizing
        if t.qtype.name not in SUPPORTED_TENSOR_TYPES:
            raise UnsupportedModelError(
                f"GGUF tensor {t.name!r} has type {t.qtype.name}; supported tensor types: {', '.join(SUPPORTED_TENSOR_TYPES)}"
            )
    embd = by_name.get("token_embd.weight")
    config = config_from_gguf(
        md,
        set(by_name),
        name=md.get("general.name") or Path(path).stem,
        embd_rows=embd.shape[0] if embd else None,
    )
    for t in f.tensors:
        hf_name(t.name)
    permute = md.get("general.architecture") == "llama"
    data = np.memmap(path, dtype=np.uint8, mode="r")
    weights: dict[str, torch.Tensor] = {}
    it = f.tensors
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"dequantizing {Path(path).name}", unit="tensor")
    for t in it:
        w = dequantize_tensor(t, data)
        name = hf_name(t.name)
        if permute and name.endswith("q_proj.weight"):
            w = unpermute_rotary(w, config.num_attention_heads)
        elif permute and name.endswith("k_proj.weight"):
            w = unpermute_rotary(w, config.num_key_value_heads)
        weights[name] = w
        if q4_blocks is not None and t.qtype.name in ("Q4_0", "Q4_1") and len(t.shape) == 2:
            from .quant_int4 import GGUFQ4Blocks

            heads = None
            if permute and name.endswith("q_proj.weight"):
                heads = config.num_attention_heads
            elif permute and name.endswith("k_proj.weight"):
                heads = config.num_key_value_heads
            q4_blocks[name] = GGUFQ4Blocks(t.qtype.name, data[t.offset:t.offset + t.nbytes],
                                           (int(t.shape[0]), int(t.shape[1])), heads)
    return config, weights, md
