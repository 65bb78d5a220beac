"""Sessions: a KV memory that outlives a request.

A session holds the `SequenceKVMemory` of everything it has seen (ingested documents, earlier prompts and
answers) plus those token ids. `generate(..., session_id=S)` continues from it without recomputing;
snapshots are safetensors files (every tensor bit-exact, config and token ids in the metadata).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field

import torch
from memserve.scheduler.kv_policy import RetrievalPolicy
from safetensors.torch import load_file, save_file

from .errors import InvalidRequestError, SessionNotFoundError
from .kv_memory import KVMemoryConfig, SequenceKVMemory

SNAPSHOT_FORMAT = "memserve.session.v2"  # v2: keys and representatives stored column-major


@dataclass(slots=True)
class Session:
    session_id: str
    memory: SequenceKVMemory
    # every token the session has seen; the memory holds the first memory.num_tokens of them (the last
    # sampled token of a generate is known but not yet computed: the next request computes it first)
    token_ids: list[int] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    busy: bool = False  # a request is running on it
    version: int = 0  # bumped by every snapshot write (runtime/durable_sessions.py)

    def info(self) -> dict:
        return {"session_id": self.session_id, "num_tokens": len(self.token_ids),
                "num_computed_tokens": self.memory.num_tokens,
                "num_blocks": self.memory.layers[0].num_blocks if self.memory.layers else 0,
                "bytes": self.memory.tier_bytes(), "created": self.created, "last_used": self.last_used,
                "busy": self.busy}


def _cfg_to_json(cfg: KVMemoryConfig) -> str:
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "policy"}
    d["policy"] = {f.name: getattr(cfg.policy, f.name) for f in dataclasses.fields(cfg.policy)}
    return json.dumps(d)


def _cfg_from_json(s: str) -> KVMemoryConfig:
    d = json.loads(s)
    d.setdefault("int4_int8_key_layers", ())  # snapshots from before per-layer kinds: every layer one kind
    pol = d.pop("policy")
    pol["dense_layers"] = tuple(pol["dense_layers"])
    pol["layer_topk"] = tuple(tuple(x) for x in pol["layer_topk"])
    return KVMemoryConfig(policy=RetrievalPolicy(**pol), **d)


def _tensors_and_meta(session: Session) -> tuple[dict, dict]:
    tensors = {}
    for i, lm in enumerate(session.memory.layers):
        for name, t in lm.state_tensors().items():
            tensors[f"layer{i}.{name}"] = t.detach().cpu().contiguous()
    m = session.memory
    hkv, d = m.layers[0].hkv, m.layers[0].d
    meta = {"format": SNAPSHOT_FORMAT, "session_id": session.session_id, "config": _cfg_to_json(m.cfg),
            "token_ids": json.dumps(session.token_ids), "num_layers": str(len(m.layers)),
            "num_kv_heads": str(hkv), "head_dim": str(d), "created": repr(session.created)}
    return tensors, meta


def save_session(session: Session, path: str) -> None:
    """Write a safetensors snapshot: every layer's tensors bit-exact, config + token ids as metadata."""
    tensors, meta = _tensors_and_meta(session)
    save_file(tensors, path, metadata=meta)


def session_to_bytes(session: Session) -> bytes:
    """The same safetensors snapshot as `save_session`, in memory (runtime/session_store.py frames it)."""
    from safetensors.torch import save

    tensors, meta = _tensors_and_meta(session)
    return save(tensors, metadata=meta)


def _check_format(meta: dict, where: str) -> None:
    fmt = meta.get("format", "")
    if fmt != SNAPSHOT_FORMAT:
        if fmt.startswith("memserve.session."):
            raise InvalidRequestError("path", f"{where} is a {fmt} snapshot; this memserve reads {SNAPSHOT_FORMAT}: "
                                              "ingest the document again and save a new snapshot")
        raise InvalidRequestError("path", f"{where} is not a memserve session snapshot ({SNAPSHOT_FORMAT})")


def _session_of(meta: dict, tensors: dict, session_id: str | None) -> Session:
    cfg = _cfg_from_json(meta["config"])
    mem = SequenceKVMemory(cfg, int(meta["num_layers"]), int(meta["num_kv_heads"]), int(meta["head_dim"]))
    for i, lm in enumerate(mem.layers):
        pre = f"layer{i}."
        lm.load_state({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
    sess = Session(session_id or meta["session_id"], mem, json.loads(meta["token_ids"]))
    sess.created = float(meta.get("created", time.time()))
    return sess


def load_session(path: str, session_id: str | None = None) -> Session:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    _check_format(meta, path)
    return _session_of(meta, load_file(path), session_id)


def session_from_bytes(data: bytes, session_id: str | None = None) -> Session:
    """Inverse of `session_to_bytes`; raises on anything that is not a snapshot of this format."""
    import struct

    from safetensors.torch import load

    (n,) = struct.unpack("<Q", data[:8])  # safetensors: u64 header length, JSON header, tensor bytes
    meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    _check_format(meta, f"session {session_id!r}")
    return _session_of(meta, load(data), session_id)


class SessionStore:
    """Sessions by id. Unknown ids raise SessionNotFoundError (a KeyError)."""

    def __init__(self):
        self._sessions: dict[str, Session] = {}

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise SessionNotFoundError(session_id) from None

    def put(self, session: Session) -> None:
        self._sessions[session.session_id] = session

    def delete(self, session_id: str) -> None:
        s = self.get(session_id)
        if s.busy:
            raise InvalidRequestError("session_id", f"session {session_id!r} has a running request; abort it first")
        del self._sessions[session_id]

    def list(self) -> list[dict]:
        return [s.info() for s in self._sessions.values()]

    def values(self):
        return self._sessions.values()


def torch_equal_sessions(a: Session, b: Session) -> bool:
    """Bit-exact comparison of two sessions' memories (used by tests)."""
    if a.token_ids != b.token_ids or len(a.memory.layers) != len(b.memory.layers):
        return False
    for la, lb in zip(a.memory.layers, b.memory.layers):
        sa, sb = la.state_tensors(), lb.state_tensors()
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True
