"""memserve.kernels — the math. Each op: a Triton kernel (CUDA), a torch path (elsewhere) and a
`*_ref` reference; the un-suffixed names dispatch (CUDA tensors -> Triton, else torch).
Signatures and layouts: kernels/README.md."""

from .block_scoring import (
    block_minmax,
    block_representatives,
    score_block_reprs,
    score_blocks_infllm,
    score_blocks_quest,
    select_topk_blocks,
)
from .block_scoring_exact import score_blocks_exact, score_blocks_exact_ref
from .block_sparse_attention import block_sparse_decode_attention, block_sparse_decode_attention_ref
from .embedding_bag import embedding_bag, embedding_bag_columns, embedding_bag_ref, quantize_rows_int8
from .kv_memory_chunk import kv_memory_chunk_attention, kv_memory_chunk_attention_ref
from .kv_memory_decode import kv_memory_decode_attention, kv_memory_decode_attention_ref
from .kv_quant import QuantizedKV, dequantize_kv, quantize_kv
from .merge import merge_attention
from .paged_attention import paged_decode_attention, paged_decode_attention_ref
from .pkm import pkm_topk, pkm_topk_ref
from .prefill_attention import prefill_attention, prefill_attention_ref

__all__ = [
    "QuantizedKV",
    "block_minmax",
    "block_representatives",
    "block_sparse_decode_attention",
    "block_sparse_decode_attention_ref",
    "dequantize_kv",
    "embedding_bag",
    "embedding_bag_columns",
    "embedding_bag_ref",
    "kv_memory_chunk_attention",
    "kv_memory_chunk_attention_ref",
    "kv_memory_decode_attention",
    "kv_memory_decode_attention_ref",
    "merge_attention",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "pkm_topk",
    "pkm_topk_ref",
    "prefill_attention",
    "prefill_attention_ref",
    "quantize_kv",
    "quantize_rows_int8",
    "score_block_reprs",
    "score_blocks_exact",
    "score_blocks_exact_ref",
    "score_blocks_infllm",
    "score_blocks_quest",
    "select_topk_blocks",
]
