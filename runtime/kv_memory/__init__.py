"""Retrieval-based KV memory (InfLLM-style): attention sinks + local window + memory blocks.

Per sequence and layer (`KVLayerStore`, store.py):
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
RetrievalPolicy.positions "ordered" (or "ordered_question": from the prompt's last chunk on) lays the selected
blocks out in their original order just before the window instead, at consecutive positions, the window at its
true positions and the sinks at one position before the blocks (positions.py; every block selected ==
`reference_attention_ordered`, tested in float64).

All work is vectorized over tokens, heads and blocks (no Python loop per token or block). The math goes
through memserve.kernels: block scores (`score_block_reprs`; for decode one call over every memory sequence
of the step whose selection is due, `attention.batched_repr_scores`), exact block scores
(`score_blocks_exact`), decode attention (`kv_memory_decode_attention`, every decoding memory sequence of a
step in one call) and prefill-chunk attention (`kv_memory_chunk_attention`, per sequence and chunk: a
sequence's chunks depend on each other; `attention.attend_chunks` scores the blocks of one chunk of each
of a step's prefilling sequences in one call) -- Triton on CUDA, the CPU-tuned torch paths elsewhere.

One role per file: config.py (KVMemoryConfig), positions.py (position scheme, chunk plans, the float64
reference), buffers.py (growable rows), quant.py (memory-tier compression), representatives.py
(block representatives), store.py (KVLayerStore / SequenceKVMemory: the store and packing), attention.py
(chunk and decode attention), working_set.py (block selection, decode slots, LRU cache), snapshots.py.
"""


from .attention import attend_chunks, attend_decode_tokens
from .config import KVMemoryConfig
from .positions import default_inv_freq, reference_attention, rotate, softmax_scale
from .store import KVLayerStore, SequenceKVMemory

__all__ = ["KVLayerStore", "attend_chunks", "attend_decode_tokens", "KVMemoryConfig", "SequenceKVMemory", "default_inv_freq", "reference_attention",
           "rotate", "softmax_scale"]
