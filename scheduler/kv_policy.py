"""KV-memory retrieval policy: the settings that decide which memory blocks each attention step
retrieves. Pure CPU configuration (no torch: the scheduler stays tensor-free); the tensor code that
applies it -- top-k per granularity, second-stage candidates, eviction order -- is
runtime/kv_memory/selection.py.

Selection (InfLLM, Xiao et al. 2024): a block's score is the query (averaged over the prefill chunk,
or the single decode query) against its representative(s) -- math, so it lives in
`memserve.kernels.score_block_reprs` (Triton on CUDA, torch elsewhere); the top-k blocks are attended.
InfLLM shares one selection across all heads of a layer; here the granularity is a choice:
  "shared"  -- one top-k per layer (the InfLLM baseline; query summed over every head),
  "kv_head" -- one top-k per KV head (query summed over its GQA group; blocks are gathered per KV head),
  "q_head"  -- one top-k per query head.
Eviction (Scissorhands / H2O "persistence of importance"): blocks that keep being selected stay;
the least often selected go first, the oldest first among equals.
"""

from __future__ import annotations

from dataclasses import dataclass

GRANULARITIES = ("shared", "kv_head", "q_head")
REPR_MODES = ("mean", "max", "quest")
UNSELECTED = ("drop", "centroid")
EXACT_MODES = ("off", "query")
EXACT_REDUCE = ("sum", "max", "z")
POSITIONS = ("infllm", "ordered", "ordered_question")


@dataclass(slots=True)
class RetrievalPolicy:
    """Defaults = the best variant measured on SmolLM2-135M (README "KV memory" ablation): per-KV-head
    selection over max-of-4-key representatives, kept stable across decode steps. Plain InfLLM is
    granularity="shared", repr_mode="mean", sticky=False (topk 16 with 128-token blocks there)."""

    topk: int = 8  # blocks per step (x block_size 64 = 512 retrieved tokens)
    granularity: str = "kv_head"
    # "max": a block keeps the keys of its repr_topk most-attended tokens and scores as their max, so
    # one needle token is not averaged away (InfLLM's "mean" ranks the needle block 13-83 in layers 1-5)
    repr_mode: str = "max"
    # decode steps keep (union) the blocks the last prefill chunk selected: the prompt's end (where a
    # question sits) picks the blocks; single decode queries alone drift
    sticky: bool = True
    # decode steps between fresh selections (1 = every step, InfLLM); in between a layer reuses the
    # blocks it gathered (a new block leaving the window also triggers a selection), so a decode step
    # costs about the same at any context length. 16: decode at 32k 1.13-1.14x of 1k instead of 1.57-1.59x
    # (bench/results/kv_memory_decode.md, median of 3 rounds), and the passkey / NIAH cells at 16k-32k
    # run with it found their needles except those listed in README "KV memory"
    reselect_every: int = 16
    # the block after each of the `next_blocks` best picks is attended too: a needle cut by a block
    # boundary keeps its tail. Measured: NIAH 32k depth 90% had its 7-digit number split 4|3 over two
    # blocks; the first ranked 0 in all 30 layers, the second was not picked, and the model wrote
    # "8071" for 8071708; with 1 or 2 it writes 8071708 (bench/kv_memory_probe.py, README "KV memory").
    # 1, not 2: on the int4 passkey grid 2 missed 8k depth 50% (" the pass key."), 1 finds it and every
    # cell 2 found (bench/results/kv_memory_ablation.md section 6)
    next_blocks: int = 1
    dense_layers: tuple[int, ...] = ()  # layers that attend to every block
    layer_topk: tuple[tuple[int, int], ...] = ()  # ((layer, k), ...) overrides of topk
    # what the blocks a step does not select contribute: "drop" (InfLLM: nothing) or "centroid" -- each
    # unselected block is one more column of the softmax, its mean key (logit + log(block_size), so a block
    # whose keys score alike keeps about its full softmax mass) with its mean value. Layers whose block
    # scores are flat (SmolLM2-135M layers 2-10 on varied text) then still see ~the whole context
    unselected: str = "drop"
    # second stage: the `rerank` best blocks by representative (per selection unit) are re-scored by the
    # exact max q.k over all of their stored keys, and the top-k is taken among them (0: off; >= the
    # number of blocks: every block scored exactly). A needle token that received little attention while
    # in the window is not among its block's representatives; its exact key still matches the question
    rerank: int = 0
    # "query": the selections that decide an answer score EVERY block by the exact max q.k over all of its
    # stored keys (memserve.kernels.score_blocks_exact, on the int codes) instead of its representatives:
    # the prefill chunk holding the end of the prompt (where the question sits; its pick stays sticky
    # through decode) and, when exact_every > 0, the first decode selection after it and then a decode
    # selection once at least exact_every decode steps passed since the last exact one. Body chunks keep
    # the representatives (cheap). "off": as before
    exact: str = "off"
    # 0: decode selections never rescore exactly (the sticky question pick stays); fresh decode selections
    # happen every reselect_every steps and when a block packs, so 1 = all of those
    exact_every: int = 0
    # blocks per step at the exact selections (0: topk). The body's chunks keep topk, so their prefill is
    # unchanged; 16 answered 5/6 tuned 16k cells where topk 8 answered 4/6 (kv_memory_retrieval_16k.md)
    exact_topk: int = 0
    # which query scores the blocks at the question's exact selection (the prefill chunk holding the prompt's
    # end): 0 = the chunk's mean query (as every chunk); N > 0 = the mean of the chunk's last N prompt tokens'
    # queries (1: the last token's, whose logits give the answer's first token). A 256-token chunk that is
    # mostly body text tail dilutes the question's query. Decode selections have one query either way
    exact_query_tokens: int = 0
    # how a KV head (granularity kv_head / shared) combines its query heads' exact scores: "sum" (as
    # representatives are), "max" (best head), "z" (per-head standardized, then summed): selection.group_scores
    exact_reduce: str = "sum"
    # ((layer, k), ...): blocks per step at the exact selections of those layers instead of exact_topk
    # (retrieval heads: some layers rank the needle far better than others)
    exact_layer_topk: tuple[tuple[int, int], ...] = ()
    # position scheme of an engaged query (runtime/kv_memory/positions.py): "infllm" -- every memory key
    # (sinks, selected blocks, window tokens past n_local) at distance n_local, no order among them;
    # "ordered" -- the selected blocks in their original order at consecutive positions just before the
    # window, which keeps its true positions, the sinks at one position before the blocks (every block
    # selected: dense RoPE attention with the sinks at position 0); "ordered_question": "ordered" only from
    # the prefill chunk holding the prompt's end on (the body's prefill is unchanged)
    positions: str = "infllm"

    def __post_init__(self):
        assert self.reselect_every >= 1, "reselect_every must be >= 1"
        assert self.topk >= 0, "topk must be >= 0 (0: sinks + window only, StreamingLLM)"
        assert self.next_blocks >= 0, "next_blocks must be >= 0"
        assert self.granularity in GRANULARITIES, f"granularity must be one of {GRANULARITIES}"
        assert self.repr_mode in REPR_MODES, f"repr_mode must be one of {REPR_MODES}"
        assert self.unselected in UNSELECTED, f"unselected must be one of {UNSELECTED}"
        assert self.rerank >= 0, "rerank must be >= 0 (0: off)"
        assert self.exact in EXACT_MODES, f"exact must be one of {EXACT_MODES}"
        assert self.exact_every >= 0, "exact_every must be >= 0 (0: only the question's prefill chunk)"
        assert self.exact_topk >= 0, "exact_topk must be >= 0 (0: topk)"
        assert self.exact_query_tokens >= 0, "exact_query_tokens must be >= 0 (0: the chunk's mean query)"
        assert self.exact_reduce in EXACT_REDUCE, f"exact_reduce must be one of {EXACT_REDUCE}"
        assert self.positions in POSITIONS, f"positions must be one of {POSITIONS}"
        assert self.positions == "infllm" or (self.granularity != "q_head" and self.unselected == "drop"), \
            "positions 'ordered*' needs granularity shared/kv_head and unselected 'drop'"
        self.exact_layer_topk = tuple((int(l), int(k)) for l, k in self.exact_layer_topk)  # JSON gives lists
        assert all(k >= 0 for _, k in self.exact_layer_topk), "exact_layer_topk: k must be >= 0"

    def exact_topk_for(self, layer: int, num_blocks: int) -> int:
        """Blocks at an exact selection of `layer`: exact_layer_topk's k for it, else max(topk_for, exact_topk)."""
        for lay, lk in reversed(self.exact_layer_topk):  # the last entry for a layer wins
            if lay == layer:
                return min(num_blocks, lk)
        k = self.topk_for(layer, num_blocks)
        return min(num_blocks, max(k, self.exact_topk)) if self.exact_topk else k

    def topk_for(self, layer: int, num_blocks: int) -> int:
        if layer in self.dense_layers:
            return num_blocks
        return min(num_blocks, dict(self.layer_topk).get(layer, self.topk) if self.layer_topk else self.topk)
