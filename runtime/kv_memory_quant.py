"""Moved to memserve.runtime.kv_memory.quant (the KV memory is a package); these names stay importable."""

from memserve.runtime.kv_memory.quant import (  # noqa: F401
    COMPRESSIONS,
    QuantizedBlocks,
    bytes_per_token_fp16,
    dequantize,
    dequantize_block_heads,
    quantize,
)
