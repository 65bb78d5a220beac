"""Engine integration of the KV memory: a retrieval AttentionBackend, a block allocator that lets
memory sequences bypass the paged pool, and the session manager the engine delegates to.

`build_kv_memory(engine, dense, allocator)` is the one hook LLMEngine's constructor calls (when
EngineArgs.kv_memory != "off"), after building the memory-aware allocator (scheduler/block_allocator.py)
and the dense backend: nothing is swapped after construction.

Which sequences use the memory, and the sub-chunks a memory sequence's prefill runs in, are the
scheduler's policy (scheduler/kv_path.py: `wants_kv_memory`, decided once when a request is added;
`prefill_chunks`); this module executes them. Memory sequences keep no paged blocks: their KV lives in a
`SequenceKVMemory` (sinks + window + compressed blocks); the allocator asks the manager whether the memory
tier has room for them (`memory_room`: admission), and the tier budget (runtime/kv_memory/budget.py:
evict, park, refuse) handles tier pressure. Preemption frees paged-pool bytes only: preempting a memory
sequence would free no pool block, so the scheduler does not count its tier bytes.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Iterator

import torch
from memserve.scheduler.block_allocator import MemoryAwareAllocator
from memserve.scheduler.kv_path import KV_MODES, prefill_chunks, wants_kv_memory
from memserve.scheduler.kv_policy import RetrievalPolicy

from .attention import AttentionBackend, AttentionMetadata
from .durable_sessions import DurableSessions
from .errors import InvalidRequestError, MemoryTierFullError, SessionNotFoundError
from .kv_memory import KVMemoryConfig, SequenceKVMemory, attend_chunks, attend_decode_tokens
from .kv_memory.budget import TierBudget, tier_bytes_per_token
from .kv_memory.profiles import profile_for
from .sessions import Session, SessionStore, load_session, save_session

log = logging.getLogger("memserve.runtime")

_POLICY_FIELDS = {f.name for f in dataclasses.fields(RetrievalPolicy)}


def make_config(overrides: dict | None) -> KVMemoryConfig:
    """KVMemoryConfig from a flat dict (policy fields such as topk/granularity may sit at top level)."""
    overrides = dict(overrides or {})
    pol = {k: overrides.pop(k) for k in list(overrides) if k in _POLICY_FIELDS}
    if isinstance(overrides.get("policy"), dict):
        pol.update(overrides.pop("policy"))
    for k in ("dense_layers",):
        if k in pol:
            pol[k] = tuple(pol[k])
    if "layer_topk" in pol:
        pol["layer_topk"] = tuple(tuple(x) for x in pol["layer_topk"])
    bad = set(overrides) - {f.name for f in dataclasses.fields(KVMemoryConfig)}
    if bad:
        raise InvalidRequestError("kv_memory_config", f"unknown fields {sorted(bad)}")
    return KVMemoryConfig(policy=RetrievalPolicy(**pol), **overrides)


class KVMemoryAttention(AttentionBackend):
    """Dense paged attention for ordinary sequences, retrieval KV memory for memory sequences."""

    def __init__(self, dense: AttentionBackend, inv_freq: torch.Tensor, num_layers: int, num_kv_heads: int,
                 head_dim: int):
        self.dense = dense
        self.inv_freq = inv_freq
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.memories: dict[str, SequenceKVMemory] = {}  # seq_id -> memory (attached sequences)
        self.configs: dict[str, KVMemoryConfig] = {}  # seq_id -> config for (re)creating its memory
        self.prompt_ends: dict[str, int] = {}  # seq_id -> position just past its prompt (RetrievalPolicy.exact)
        self.tier: TierBudget | None = None  # the replica-wide memory-tier budget (set by the manager)

    def attach(self, seq_id: str, cfg: KVMemoryConfig, memory: SequenceKVMemory | None = None,
               prompt_end: int | None = None) -> None:
        self.configs[seq_id] = cfg
        if prompt_end is not None:
            self.prompt_ends[seq_id] = prompt_end
        if memory is not None:
            self.memories[seq_id] = memory

    def new_memory(self, cfg: KVMemoryConfig) -> SequenceKVMemory:
        mem = SequenceKVMemory(cfg, self.num_layers, self.num_kv_heads, self.head_dim)
        mem.attach_tier(self.tier)
        return mem

    def prepare(self, meta: AttentionMetadata) -> None:
        st = meta.backend_state
        mem_rows = [i for i, s in enumerate(meta.seq_ids) if s in self.configs]
        if not mem_rows:
            st["kvm"] = None
            self.dense.prepare(meta)
            return
        if self.tier is not None:  # exact count once per step; packs keep it current within the step
            self.tier.sync()
        cu = meta.cu_seqlens_q.tolist()
        mem = []
        for i in mem_rows:
            sid = meta.seq_ids[i]
            if sid not in self.memories:  # new, or recomputing after a preemption
                assert meta.num_computed_tokens[i] == 0, f"{sid}: no KV memory for computed tokens"
                self.memories[sid] = self.new_memory(self.configs[sid])
            self.memories[sid].set_prompt_end(self.prompt_ends.get(sid))
            mem.append((self.memories[sid], cu[i], cu[i + 1], meta.num_computed_tokens[i]))
        dense_rows = [i for i in range(meta.num_seqs) if i not in set(mem_rows)]
        sub = None
        if dense_rows:
            sub = AttentionMetadata.build(
                [meta.seq_ids[i] for i in dense_rows], [meta.query_lens[i] for i in dense_rows],
                [meta.num_computed_tokens[i] for i in dense_rows], [meta.block_tables[i] for i in dense_rows],
                meta.block_size, device=meta.positions.device)
            idx = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in dense_rows]).to(meta.positions.device)
            self.dense.prepare(sub)
            sub = (sub, idx)
        st["kvm"] = (mem, sub)

    def forward(self, layer, q, k, v, meta):
        kvm = meta.backend_state["kvm"]
        if kvm is None:
            return self.dense.forward(layer, q, k, v, meta)
        mem, sub = kvm
        if sub is None and len(mem) == 1 and mem[0][2] - mem[0][1] == 1:  # one memory sequence decoding
            sm, _, _, p0 = mem[0]
            return sm.layers[layer].attend(q, k, v, p0, self.inv_freq, self.scale)
        out = q.new_empty(q.shape)
        if sub is not None:
            sub_meta, idx = sub
            out[idx] = self.dense.forward(layer, q[idx], k[idx], v[idx], sub_meta)
        # every memory sequence decoding one token: one kernel-op call for all of them
        dec = [(sm, a, p0) for sm, a, b, p0 in mem if b - a == 1 and sm.layers[layer]._token_step(q)]
        if dec:
            rows = [a for _, a, _ in dec]
            out[rows] = attend_decode_tokens([sm.layers[layer] for sm, _, _ in dec], q[rows], k[rows], v[rows],
                                             [p0 for _, _, p0 in dec], self.inv_freq, self.scale)
        # the other memory sequences prefill in the pieces the scheduler cut (scheduler/kv_path.py): round r
        # attends every sequence's r-th piece together (block scoring in one call; a sequence's own pieces
        # run in order)
        decoded = {a for _, a, _ in dec}
        pieces = [(sm.layers[layer], [(a + off, n, p0 + off) for off, n in
                                      prefill_chunks(p0, b - a, sm.cfg.chunk_size, sm.cfg.dense_limit)])
                  for sm, a, b, p0 in mem if a not in decoded]
        for r in range(max((len(ps) for _, ps in pieces), default=0)):
            rnd = [(lm, ps[r]) for lm, ps in pieces if r < len(ps)]
            outs = attend_chunks([lm for lm, _ in rnd], *([x[c : c + n] for _, (c, n, _) in rnd] for x in (q, k, v)),
                                 [p for _, (_, _, p) in rnd], self.inv_freq, self.scale)
            for (_, (c, n, _)), o in zip(rnd, outs):
                out[c : c + n] = o
        return out

    def free(self, seq_id: str) -> None:
        self.memories.pop(seq_id, None)
        self.dense.free(seq_id)

    def release(self, seq_id: str) -> SequenceKVMemory | None:
        """Detach a finished sequence, handing its memory over (to its session)."""
        self.configs.pop(seq_id, None)
        self.prompt_ends.pop(seq_id, None)
        return self.memories.pop(seq_id, None)


class KVMemoryManager:
    """Per-engine KV-memory state: mode, defaults, which requests use the memory, sessions."""

    def __init__(self, engine, mode: str, cfg: KVMemoryConfig, backend: KVMemoryAttention,
                 allocator: MemoryAwareAllocator):
        assert mode in KV_MODES
        self.engine, self.mode, self.cfg = engine, mode, cfg
        self.backend, self.allocator = backend, allocator
        self.sessions = SessionStore()
        # the snapshot store behind the RAM sessions (no-op without EngineArgs.session_store)
        self.durable = DurableSessions(self.sessions, backend, engine.args.session_store)
        self.request_session: dict[str, str] = {}  # request id -> session id
        self.ingests: dict[str, dict] = {}  # request id -> progress of an ingest
        self._ingest_ids: set[str] = set()  # ingest requests: their sampled token is discarded
        self._ids = itertools.count()
        self.profile: str | None = None  # name of the per-model profile applied (kv_memory/profiles.py)
        # hook to park an idle session when the memory tier is at its budget: (session id) -> True if it
        # was parked (snapshotted and removed from self.sessions, e.g. by a durable session store). None:
        # sessions are not parked, blocks are evicted instead. With a durable store (EngineArgs.session_store)
        # this is its park_one: the one parking path, which never drops a session without a snapshot
        self.park_session = self.durable.park_one if self.durable.store is not None else None
        args = engine.args
        self.tier_policy = args.kv_memory_tier_policy
        self.tier: TierBudget | None = None
        if args.kv_memory_tier_bytes is not None:
            self.tier = TierBudget(args.kv_memory_tier_bytes, self.all_memories, self._park)
            backend.tier = self.tier
            allocator.memory_room = self.memory_room
        self._bytes_per_token: dict[int, float] = {}
        self._projected: dict[str, int] = {}  # memory request -> prompt + max_tokens (policy "refuse")
        self._reserved: dict[str, float] = {}  # admitted memory request -> tier bytes it reserved

    # --------------------------------------------------------------------------- memory tier
    def all_memories(self):
        yield from self.backend.memories.values()
        yield from (s.memory for s in self.sessions.values())

    def _park(self, over: int) -> int:
        """Park idle sessions, least recently used first, until `over` bytes are freed; returns bytes freed."""
        if self.park_session is None:
            return 0
        freed = 0
        for s in sorted((s for s in self.sessions.values() if not s.busy), key=lambda s: s.last_used):
            if freed >= over:
                break
            b = s.memory.tier_bytes()["memory"]
            if self.park_session(s.session_id) and s.session_id not in self.sessions:
                freed += b
        return freed

    def tier_bytes_per_token(self, cfg: KVMemoryConfig) -> float:
        key = id(cfg)
        if key not in self._bytes_per_token:
            b = self.backend
            self._bytes_per_token[key] = tier_bytes_per_token(cfg, b.num_layers, b.num_kv_heads, b.head_dim,
                                                              self.engine.args.torch_dtype)
        return self._bytes_per_token[key]

    def memory_room(self, seq_id: str, num_tokens: int) -> bool:
        """The allocator's question for a memory sequence: may it grow to num_tokens? Under policy "evict" a
        sequence always may (packing evicts to stay in budget). Under "refuse" a sequence is admitted once,
        reserving the bytes of its whole prompt + max_tokens, only while the reservations of the admitted
        sequences plus the idle sessions fit the budget (idle sessions are parked first if a hook is set);
        otherwise it waits in the queue."""
        if self.tier_policy == "evict" or seq_id in self._reserved:
            return True
        cfg = self.backend.configs.get(seq_id, self.cfg)
        need = self._projected.get(seq_id, num_tokens) * self.tier_bytes_per_token(cfg)

        def fits():
            idle = sum(s.memory.tier_bytes()["memory"] for s in self.sessions.values() if not s.busy)
            return idle + sum(self._reserved.values()) + need <= self.tier.limit

        if not fits() and not (self._park(int(need)) and fits()):
            return False
        self._reserved[seq_id] = need
        return True

    def _check_fits(self, num_tokens: int, cfg: KVMemoryConfig) -> None:
        if self.tier is None or self.tier_policy != "refuse":
            return
        need = num_tokens * self.tier_bytes_per_token(cfg)
        if need > self.tier.limit:
            raise MemoryTierFullError(
                f"this request's KV memory needs ~{int(need)} bytes but the replica's memory tier holds at most "
                f"{self.tier.limit} (kv_memory_tier_bytes): shorten the prompt or max_tokens, raise "
                "kv_memory_tier_bytes, or use kv_memory_tier_policy='evict'")

    # --------------------------------------------------------------------------- requests
    def uses_memory(self, request_id: str) -> bool:
        return request_id in self.allocator.memory_seqs

    def wants_memory(self, num_prompt_tokens: int, params, session_id: str | None) -> bool:
        """The scheduler's memory-vs-dense choice (scheduler/kv_path.py) for this request."""
        try:
            return wants_kv_memory(self.mode, num_prompt_tokens, params.max_tokens, self.engine.max_model_len,
                                   getattr(params, "kv_memory", None), session_id is not None)
        except ValueError as e:
            raise InvalidRequestError("kv_memory", str(e)) from None

    def config_for(self, params) -> KVMemoryConfig:
        topk = getattr(params, "memory_topk", None)
        if topk is None:
            return self.cfg
        return dataclasses.replace(self.cfg, policy=dataclasses.replace(self.cfg.policy, topk=topk))

    def on_add(self, req) -> None:
        """Called by the engine when a request is enqueued: route it to the memory or the dense path."""
        seq = req.seq
        sid = req.session_id
        if not self.wants_memory(seq.num_prompt_tokens, req.params, sid):
            return
        mem = None
        if sid is not None:
            try:
                sess = self.durable.lookup(sid)  # RAM, else the store; DataLossError propagates to the caller
            except SessionNotFoundError:
                sess = Session(sid, self.backend.new_memory(self.config_for(req.params)))
                self.sessions.put(sess)
            if sess.busy:
                raise InvalidRequestError("session_id", f"session {sid!r} already has a running request")
            sess.busy = True
            self.request_session[req.request_id] = sid
            # continue from the stored memory: the session's tokens become a computed prefix
            seq.token_ids = list(sess.token_ids) + seq.token_ids
            seq.num_prompt_tokens = len(seq.token_ids)
            seq.num_computed_tokens = req.num_cached_tokens = sess.memory.num_tokens
            mem = sess.memory
            if req.request_id in self._ingest_ids:
                self.ingests[req.request_id] = {"session_id": sid, "total": seq.num_tokens,
                                                "start": seq.num_computed_tokens}
        cfg = mem.cfg if mem is not None else self.config_for(req.params)
        try:
            self._check_fits(seq.num_tokens + req.params.max_tokens, cfg)
        except MemoryTierFullError:
            if sid is not None:
                self.request_session.pop(req.request_id, None)
                self.sessions.get(sid).busy = False
            raise
        self._projected[req.request_id] = seq.num_tokens + req.params.max_tokens
        self.allocator.memory_seqs.add(req.request_id)
        # an ingest is a document, not a question: no prompt end, so question-time exact block scoring
        # (RetrievalPolicy.exact) waits for the request that continues the session, and a document ingested in
        # pieces (chunk-aligned) is prefilled exactly like one prompt
        end = None if req.request_id in self._ingest_ids else seq.num_prompt_tokens
        self.backend.attach(req.request_id, cfg, mem, prompt_end=end)

    def on_finish(self, req) -> None:
        """Called by the engine after a request finished/aborted: hand its memory to its session."""
        rid = req.request_id
        mem = self.backend.release(rid)
        self.allocator.memory_seqs.discard(rid)
        self._projected.pop(rid, None)
        self._reserved.pop(rid, None)
        sid = self.request_session.pop(rid, None)
        self.ingests.pop(rid, None)
        if sid is None or sid not in self.sessions:
            return
        sess = self.sessions.get(sid)
        sess.busy = False
        sess.last_used = time.time()
        seq = req.seq
        if mem is None or mem.num_tokens != seq.num_computed_tokens:  # preempted and not recomputed
            # the request's memory (the session's, continued) is gone: go back to the session's last
            # snapshot -- its state before this request -- rather than an empty session
            restored = self.durable.restore(sid)
            if restored is not None:
                self.sessions.put(restored)
                return
            log.warning("session %r: its request %r was preempted and finished before recompute, and no "
                        "snapshot exists (no --session-store): the session restarts empty", sid, rid)
            mem = self.backend.new_memory(sess.memory.cfg)
            seq_tokens = []
        else:
            seq_tokens = list(seq.token_ids)
        sess.memory = mem
        if rid in self._ingest_ids:
            # an ingest: the sampled token is not part of the document
            seq_tokens = seq_tokens[: seq.num_computed_tokens]
            self._ingest_ids.discard(rid)
        sess.token_ids = seq_tokens
        self.durable.persist(sess)  # the session changed: its snapshot follows

    def max_len(self, req) -> int:
        return 1 << 62 if self.uses_memory(req.request_id) else self.engine.max_model_len

    # --------------------------------------------------------------------------- sessions
    @staticmethod
    def ingest_params():
        """An ingest is a request that prefills and samples one token, which is then discarded."""
        from .sampling import SamplingParams

        return SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def new_ingest_id(self, session_id: str) -> str:
        rid = f"ingest-{session_id}-{next(self._ids)}"
        self._ingest_ids.add(rid)  # marks the request as an ingest before it is added
        return rid

    def add_ingest(self, session_id: str, prompt) -> str:
        """Enqueue an ingest (prefill without generating) of `prompt` into the session; returns its id."""
        rid = self.new_ingest_id(session_id)
        self.engine.add_request(rid, prompt, self.ingest_params(), session_id=session_id)
        return rid

    def ingest_progress(self, request_id: str) -> dict:
        """{"tokens_done", "tokens_total", "done"} of an ingest (done once the request left the engine)."""
        info = self.ingests.get(request_id)
        req = self.engine.requests.get(request_id)
        if req is None or info is None:
            return {"tokens_done": None, "tokens_total": None, "done": req is None}
        done = req.seq.num_computed_tokens - info["start"]
        return {"tokens_done": done, "tokens_total": info["total"] - info["start"], "done": False}

    def ingest(self, session_id: str, prompt) -> Iterator[dict]:
        """Synchronous ingest for offline use: steps the engine until the document is in the session,
        yielding progress dicts. (Other requests' outputs of those steps are not returned.)"""
        rid = self.add_ingest(session_id, prompt)
        total = self.ingest_progress(rid)["tokens_total"]
        while rid in self.engine.requests:
            self.engine.step()
            p = self.ingest_progress(rid)
            if not p["done"]:
                yield p
        yield {"tokens_done": total, "tokens_total": total, "done": True,
               "session": self.durable.info(session_id)}

    def stats(self) -> tuple[dict[str, int], int, int]:
        dev = mem = 0
        retrieved = 0
        seen = set()
        for m in itertools.chain(self.backend.memories.values(), (s.memory for s in self.sessions.values())):
            if id(m) in seen:
                continue
            seen.add(id(m))
            b = m.tier_bytes()
            dev += b["device"]
            mem += b["memory"]
            retrieved += m.blocks_retrieved()
        return {"memory_device": dev, "memory": mem}, len(self.sessions), retrieved

    def save_session(self, session_id: str, path: str) -> None:
        save_session(self.durable.lookup(session_id), path)

    def load_session(self, path: str, session_id: str | None = None) -> dict:
        s = load_session(path, session_id)
        s.memory.attach_tier(self.tier)
        lm = s.memory.layers[0]
        if (len(s.memory.layers), lm.hkv, lm.d) != (self.backend.num_layers, self.backend.num_kv_heads,
                                                    self.backend.head_dim):
            raise InvalidRequestError("path", "snapshot was taken with a model of another shape")
        self.sessions.put(s)
        self.durable.persist(s)
        return s.info()


def build_kv_memory(engine, dense: AttentionBackend, allocator: MemoryAwareAllocator):
    """The retrieval backend (over the dense one) and the manager, built once by LLMEngine.__init__."""
    args = engine.args
    assert args.kv_memory in KV_MODES, f"kv_memory must be one of {KV_MODES}, got {args.kv_memory!r}"
    assert isinstance(allocator, MemoryAwareAllocator), "the KV memory needs the memory-aware allocator"
    c = engine.config
    profile = profile_for(c.name or str(engine.checkpoint_source), c.num_hidden_layers, c.num_key_value_heads,
                          c.head_dim, c.hidden_size, args.kv_memory_profile)
    # the model's profile over KVMemoryConfig's defaults, the user's kv_memory_config over both
    cfg = make_config({**(profile.overrides if profile else {}), **(args.kv_memory_config or {})})
    backend = KVMemoryAttention(dense, engine.rope.inv_freq, c.num_hidden_layers, c.num_key_value_heads,
                                c.head_dim)
    manager = KVMemoryManager(engine, args.kv_memory, cfg, backend, allocator)
    manager.profile = profile.name if profile else None
    return backend, manager
