"""LLMEngine: continuous batching over the paged KV cache. One step = plan -> run -> post-process.

    plan = scheduler.schedule()            # which sequences, how many new tokens each (scheduler/)
    logits = model.forward(plan's tokens)  # one flattened batch: prefill chunks + decode tokens
    outputs = post-process(sample(logits)) # append tokens, detokenize, check stops, free finished
"""

from __future__ import annotations

import time

import torch
from memserve.scheduler.batch_plan import BatchPlan, Scheduler, SchedulerConfig, Sequence
from memserve.scheduler.block_allocator import BlockAllocator, MemoryAwareAllocator

from .attention import AttentionMetadata, DensePagedAttention, RotaryEmbedding
from .decode_step import DecodeStep
from .engine_args import EngineArgs, EngineStats
from .errors import InvalidRequestError
from .ffn import memory_layers_info
from .kv_cache import KVCache, KVCacheSpec, kv_bytes_per_block, num_blocks_for_budget
from .loader import Checkpoint, load_checkpoint
from .model import Model
from .outputs import RequestMetrics, RequestOutput
from .sampling import SamplingParams, sample
from .tokenizer import IncrementalDetokenizer, missing_tokenizer_error


class Request:
    """Engine-side state of one request (the scheduler sees only `seq`)."""

    __slots__ = ("request_id", "seq", "params", "prompt", "detok", "text", "generator", "metrics", "session_id",
                 "finish_reason", "stop_reason", "num_sent_tokens", "num_sent_chars", "stop_ids", "hold_back",
                 "num_cached_tokens")

    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                 detok: IncrementalDetokenizer | None, eos_ids: list[int], session_id: str | None):
        self.request_id = request_id
        self.seq = Sequence(request_id, prompt_ids)
        self.params = params
        self.prompt = prompt
        self.detok = detok
        self.text = ""
        self.generator = params.make_generator()
        self.metrics = RequestMetrics(arrival_time=time.time())
        self.session_id = session_id
        self.finish_reason: str | None = None
        self.stop_reason = None
        self.num_sent_tokens = 0
        self.num_sent_chars = 0
        self.num_cached_tokens = 0  # prompt tokens whose KV was reused, not computed (a session's memory)
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        # characters that may be the start of a stop string are held back while streaming
        self.hold_back = max((len(s) for s in params.stop), default=1) - 1

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.seq.token_ids[:self.seq.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.token_ids[self.seq.num_prompt_tokens:]


class LLMEngine:
    def __init__(self, model: str | Checkpoint = "default", args: EngineArgs | None = None, **engine_args):
        """`model`: "default", an HF directory, a .gguf file, or an already loaded `Checkpoint`."""
        if args is None:
            args = EngineArgs(**engine_args)
        elif engine_args:
            raise TypeError("pass either args=EngineArgs(...) or keyword engine args, not both")
        self.args = args
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        ckpt = model if isinstance(model, Checkpoint) else load_checkpoint(model, progress=args.progress)
        self.checkpoint_source = ckpt.source
        self.config = c = ckpt.config
        self.tokenizer = ckpt.tokenizer
        self.eos_token_ids = list(c.eos_token_ids or (self.tokenizer.eos_token_ids if self.tokenizer else []))
        dtype = args.torch_dtype
        # an engine that loaded the checkpoint itself owns its weights: let the model consume them
        self.model = Model(c, ckpt.weights, quantization=args.quantization, dtype=dtype, device=args.device,
                           consume=not isinstance(model, Checkpoint), int4=args.int4_options(),
                           q4_blocks=ckpt.q4_blocks)

        if args.num_kv_blocks is not None:
            num_blocks = args.num_kv_blocks
        else:
            num_blocks = num_blocks_for_budget(args.kv_cache_bytes, c.num_hidden_layers, args.block_size,
                                               c.num_key_value_heads, c.head_dim, dtype)
        spec = KVCacheSpec(c.num_hidden_layers, num_blocks, args.block_size, c.num_key_value_heads, c.head_dim,
                           dtype, args.device)
        self.kv_cache = KVCache(spec)
        # the KV managers are built here, once: with the KV memory on, the paged pool's allocator lets memory
        # sequences take no pool blocks (block 0 is their scratch block, unusable by dense sequences) and
        # asks the memory tier's budget whether they may grow
        block_bytes = kv_bytes_per_block(c.num_hidden_layers, args.block_size, c.num_key_value_heads, c.head_dim,
                                         dtype)
        if args.kv_memory != "off":
            self.allocator = MemoryAwareAllocator(num_blocks, args.block_size, block_bytes)
            usable_blocks = num_blocks - 1
        else:
            self.allocator = BlockAllocator(num_blocks, args.block_size, block_bytes)
            usable_blocks = num_blocks
        self.scheduler = Scheduler(SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens), self.allocator)
        self.rope = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling)
        self.attn = DensePagedAttention(self.kv_cache, self.rope, c.num_attention_heads, c.num_key_value_heads,
                                        c.head_dim)
        # a sequence can never outgrow the model's window nor the whole KV pool
        self.max_model_len = min(args.max_model_len or c.max_position_embeddings, usable_blocks * args.block_size)
        self.requests: dict[str, Request] = {}
        self.last_step_ids: list[str] = []
        self.decode_step = None
        if args.decode_path != "off":  # memory layers too: their FFN runs through the step's hook
            self.decode_step = DecodeStep(self.model, self.rope, self.kv_cache.storage,
                                          compile=args.decode_path == "compile", native=args.decode_path == "native")
        self.memory = None  # KVMemoryManager when the KV memory is enabled
        if args.kv_memory != "off":
            from .kv_memory_backend import build_kv_memory

            self.attn, self.memory = build_kv_memory(self, self.attn, self.allocator)

    # ------------------------------------------------------------------------------------ requests
    def prepare_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                        session_id: str | None = None) -> Request:
        """Validate and tokenize (raises InvalidRequestError); does not enqueue."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params", f"expected SamplingParams, got {type(params).__name__}")
        params.validate()
        if session_id is not None and self.memory is None:
            self._sessions()  # SessionsUnsupportedError: a session would be silently ignored otherwise
        if request_id in self.requests:
            raise InvalidRequestError("request_id", f"request {request_id!r} is already running")
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise missing_tokenizer_error(self.checkpoint_source)
            text = prompt
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                      for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise InvalidRequestError("prompt", f"token ids must be in [0, {self.config.vocab_size}), "
                                                    f"got {bad[:5]}")
        else:
            raise InvalidRequestError("prompt", f"must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise InvalidRequestError("prompt", "is empty")
        if len(ids) >= self.max_model_len and not (self.memory and self.memory.wants_memory(len(ids), params,
                                                                                                session_id)):
            raise InvalidRequestError(
                "prompt", f"is {len(ids)} tokens but this engine serves at most {self.max_model_len} tokens per "
                f"sequence (prompt + output; model context {self.config.max_position_embeddings}, "
                f"KV pool {self.allocator.num_blocks * self.allocator.block_size} tokens) and long-context "
                "memory is not enabled: shorten the prompt")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop", "stop strings need a tokenizer; this model has none (use stop_token_ids)")
        detok = IncrementalDetokenizer(self.tokenizer, ids) if self.tokenizer is not None else None
        return Request(request_id, text, ids, params, detok, self.eos_token_ids, session_id)

    def add_prepared(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise InvalidRequestError("request_id", f"request {req.request_id!r} is already running")
        if self.memory is not None:
            self.memory.on_add(req)  # may route the request to the KV memory / attach its session
        self.requests[req.request_id] = req
        self.scheduler.add(req.seq)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    session_id: str | None = None) -> None:
        self.add_prepared(self.prepare_request(request_id, prompt, params, session_id))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; returns its final output (finish_reason "abort")."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        return self._finish(req, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        self.last_step_ids: list[str] = []
        plan = self.scheduler.schedule()
        for seq in plan.preempted:
            self.attn.free(seq.seq_id)
        if plan.is_empty:
            return []
        # the requests this step computes: if the forward raises, these (only) are failed
        self.last_step_ids = [s.seq.seq_id for s in plan.scheduled]
        sampled = self._run(plan)
        self.scheduler.update_from_output(plan, sampled)
        return self._postprocess(plan, sampled)

    def _run(self, plan: BatchPlan) -> dict[str, int]:
        ids: list[int] = []
        rows: list[int] = []  # flattened-batch row of each sampled sequence's last token
        sampled_reqs: list[Request] = []
        now = time.time()
        for s in plan.scheduled:
            seq = s.seq
            ids.extend(seq.token_ids[s.start:s.start + s.num_new_tokens])
            req = self.requests[seq.seq_id]
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            if s.sample:
                rows.append(len(ids) - 1)
                sampled_reqs.append(req)
        logits = None  # the decode steps' fast paths where they apply, else Model.forward
        if self.decode_step is not None and len(rows) == 1 == len(ids):
            logits = self._decode_one(plan.scheduled[0], ids[0])
        elif (getattr(self.decode_step, "batched", None) is not None and len(ids) > 1
                and len(rows) == len(ids) == len(plan.scheduled)):
            logits = self._decode_batch(plan, ids)
        if logits is None:
            meta = AttentionMetadata.build(
                [s.seq.seq_id for s in plan.scheduled], [s.num_new_tokens for s in plan.scheduled],
                [s.start for s in plan.scheduled], [self.allocator.tables[s.seq.seq_id] for s in plan.scheduled],
                self.allocator.block_size, device=self.args.device)
            if not rows:  # only partial prefill chunks this step: no LM head at all
                self.model.forward(torch.tensor(ids, device=self.args.device), meta, self.attn,
                                   torch.empty(0, dtype=torch.int64, device=self.args.device))
                return {}
            logits = self.model.forward(torch.tensor(ids, device=self.args.device), meta, self.attn,
                                        torch.tensor(rows, device=self.args.device))  # (N, V)
        tokens = sample(logits, [r.params for r in sampled_reqs], [r.generator for r in sampled_reqs])
        return {r.request_id: t for r, t in zip(sampled_reqs, tokens)}

    def _in_kv_memory(self, seq_id: str) -> bool:
        return seq_id in getattr(self.attn, "configs", ())  # KVMemoryAttention's memory sequences

    def _decode_one(self, s, token: int) -> torch.Tensor | None:
        """Logits of a lone decode token through `decode_step`, or None where that path does not apply: the
        sequence is in the KV memory, or its blocks are not consecutive (its context is then no slice)."""
        sid = s.seq.seq_id
        if self._in_kv_memory(sid):
            return None
        bs = self.allocator.block_size
        table = self.allocator.tables[sid]
        n = s.start + 1
        nb = (n + bs - 1) // bs
        first = table[0]
        if table[nb - 1] - first != nb - 1 or (nb > 2 and table[:nb] != list(range(first, first + nb))):
            return None
        return self.decode_step(token, s.start, first * bs + s.start, first * bs, first * bs + s.start)

    def _decode_batch(self, plan: BatchPlan, ids: list[int]) -> torch.Tensor | None:
        """Logits of one decode token per scheduled sequence through the batched C++ step (kernels/
        cpu_decode_batched.py), or None where it does not apply: a sequence is in the KV memory."""
        if any(self._in_kv_memory(s.seq.seq_id) for s in plan.scheduled):
            return None
        bs = self.allocator.block_size
        tables = [self.allocator.tables[s.seq.seq_id] for s in plan.scheduled]
        pos = [s.start for s in plan.scheduled]
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, pos)]
        return self.decode_step.batch(ids, pos, slots, tables)

    @property
    def decode_compile_seconds(self) -> float | None:
        """Seconds the compiled decode step took to compile (None: not compiled, or not yet run)."""
        return None if self.decode_step is None else self.decode_step.compile_seconds

    def _postprocess(self, plan: BatchPlan, sampled: dict[str, int]) -> list[RequestOutput]:
        outputs = []
        now = time.time()
        for s in plan.scheduled:
            if not s.sample:
                continue
            req = self.requests.get(s.seq.seq_id)
            if req is None or req.finish_reason is not None:
                continue
            token = sampled[req.request_id]
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            finish, stop_reason = None, None
            if token in req.stop_ids:  # EOS / stop token: ends the request, its text is not emitted
                finish, stop_reason = "stop", token
            elif req.detok is not None:
                prev_len = len(req.text)
                req.text += req.detok.add([token])
                if req.params.stop:
                    finish, stop_reason = self._check_stop_strings(req, prev_len)
            if finish is None:
                max_len = self.memory.max_len(req) if self.memory is not None else self.max_model_len
                if req.seq.num_output_tokens >= req.params.max_tokens or req.seq.num_tokens >= max_len:
                    finish = "length"
            if finish is not None:
                outputs.append(self._finish(req, finish, stop_reason))
            else:
                outputs.append(self._make_output(req))
        return outputs

    def _check_stop_strings(self, req: Request, prev_len: int):
        # the text before this step held no stop string, so a new match starts at most
        # (longest stop - 1) chars before the new piece
        start = max(0, prev_len - req.hold_back)
        best = None
        for s in req.params.stop:
            i = req.text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None, None
        req.text = req.text[:best[0]]
        return "stop", best[1]

    def _finish(self, req: Request, reason: str, stop_reason=None) -> RequestOutput:
        req.finish_reason = reason
        req.stop_reason = stop_reason
        req.metrics.finished_time = time.time()
        if req.detok is not None and not isinstance(stop_reason, str):
            req.text += req.detok.flush()
        self.scheduler.finish(req.seq)
        if self.memory is not None:
            self.memory.on_finish(req)  # a session keeps the request's KV memory
        self.attn.free(req.request_id)
        del self.requests[req.request_id]
        return self._make_output(req)

    def _make_output(self, req: Request) -> RequestOutput:
        out_ids = req.output_token_ids
        if req.finish_reason is None:
            visible = len(req.text) - req.hold_back if req.hold_back else len(req.text)
            visible = max(visible, req.num_sent_chars)
        else:
            visible = len(req.text)
        text = req.text[:visible]
        new_text = text[req.num_sent_chars:]
        new_ids = out_ids[req.num_sent_tokens:]
        req.num_sent_chars, req.num_sent_tokens = len(text), len(out_ids)
        return RequestOutput(
            request_id=req.request_id, prompt_token_ids=req.prompt_token_ids, token_ids=list(out_ids),
            text=text, new_token_ids=new_ids, new_text=new_text, finish_reason=req.finish_reason,
            num_cached_tokens=req.num_cached_tokens, metrics=req.metrics, prompt=req.prompt, stop_reason=req.stop_reason,
            session_id=req.session_id)

    # ------------------------------------------------------------------------------------ introspection
    def stats(self) -> EngineStats:
        a = self.allocator
        used = a.num_blocks - a.num_free_blocks
        per_block = kv_bytes_per_block(self.config.num_hidden_layers, a.block_size, self.config.num_key_value_heads,
                                       self.config.head_dim, self.args.torch_dtype)
        st = EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage_perc=a.usage, num_free_blocks=a.num_free_blocks, num_total_blocks=a.num_blocks,
            kv_memory_bytes={"device": used * per_block}, num_preemptions_total=self.scheduler.num_preemptions_total,
            memory_lookups_total=self.model.lookup_stats.lookups_total,
            memory_lookup_seconds_total=self.model.lookup_stats.lookup_seconds_total,
            memory_lookup_layers=self.model.lookup_stats.layer_histograms())
        if self.memory is not None:
            tiers, st.sessions_active, st.blocks_retrieved_total = self.memory.stats()
            st.kv_memory_bytes.update(tiers)
        return st

    # ------------------------------------------------------------------------------------ sessions (KV memory)
    def _sessions(self):
        if self.memory is None:
            from .errors import SessionsUnsupportedError

            raise SessionsUnsupportedError()
        return self.memory

    def ingest(self, session_id: str, prompt: str | list[int]):
        """Append a document to a session without generating; yields progress dicts (offline use)."""
        return self._sessions().ingest(session_id, prompt)

    def add_ingest(self, session_id: str, prompt: str | list[int]) -> str:
        """Enqueue an ingest; poll `ingest_progress(request_id)` while stepping (async engine)."""
        return self._sessions().add_ingest(session_id, prompt)

    def ingest_progress(self, request_id: str) -> dict:
        return self._sessions().ingest_progress(request_id)

    def get_session(self, session_id: str) -> dict:
        """Info of a session in RAM or in the snapshot store ("resident": whether this replica holds it)."""
        return self._sessions().durable.info(session_id)

    def delete_session(self, session_id: str) -> None:
        self._sessions().durable.delete(session_id)

    def list_sessions(self) -> list[dict]:
        """Sessions in RAM, then those only in the snapshot store (a restarted replica lists them)."""
        return self._sessions().durable.list()

    def resident_sessions(self) -> list[str]:
        """Ids of the sessions this engine holds in RAM (what affinity routing should prefer)."""
        return self.memory.durable.resident_ids() if self.memory is not None else []

    def flush_sessions(self) -> int:
        """Snapshot every session not yet in the store (before a drain); returns how many were written."""
        return self.memory.durable.flush() if self.memory is not None else 0

    def save_session(self, session_id: str, path: str) -> None:
        self._sessions().save_session(session_id, path)

    def load_session(self, path: str, session_id: str | None = None) -> dict:
        return self._sessions().load_session(path, session_id)

    def model_info(self) -> dict:
        c = self.config
        return {
            "name": c.name or self.checkpoint_source, "source": self.checkpoint_source,
            "architecture": c.architecture, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "num_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
            "max_position_embeddings": c.max_position_embeddings, "max_model_len": self.max_model_len,
            "dtype": str(self.args.torch_dtype).removeprefix("torch."), "quantization": self.args.quantization,
            "device": self.args.device, "block_size": self.allocator.block_size,
            "num_kv_blocks": self.allocator.num_blocks, "kv_cache_bytes": self.kv_cache.nbytes,
            "weight_bytes": self.model.nbytes, "has_tokenizer": self.tokenizer is not None,
            "eos_token_ids": list(self.eos_token_ids), "max_num_seqs": self.args.max_num_seqs,
            "max_num_batched_tokens": self.args.max_num_batched_tokens,
            "memory_layers": memory_layers_info(self.model),
        }
