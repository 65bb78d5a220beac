"""Sessions that outlive a replica: RAM is a cache in front of the snapshot store.

The KV-memory manager calls these on the engine thread (the one owner of engine state):
  * `lookup(sid)`   a session not in RAM (another replica wrote it, this replica restarted, it was
                    parked) is loaded from the store; a RAM copy older than the stored version (the
                    session was served elsewhere meanwhile) is reloaded.
  * `persist(sess)` after every request that changed the session (ingest done, generation done,
                    aborted) and when one is loaded from a file: one atomic snapshot per change.
  * `park_one(sid)` the one parking path: when the replica's memory tier is at its byte budget
                    (EngineArgs.kv_memory_tier_bytes, kv_memory/budget.py) the manager parks idle
                    sessions, least recently used first, through this hook: snapshot if needed, then
                    free from RAM. Without a store nothing is parked (blocks are evicted instead).
Without a store (EngineArgs.session_store None) every method is a no-op and sessions live in RAM only.

Cost: a snapshot is the session's whole KV memory (the compressed memory tier plus the windows),
serialized on the engine thread after each request on it. Measured with the tiny test model it is
sub-millisecond; for a 32k-token session of the default model it is the size of `bytes` in
GetSession, written at disk speed — small against the minutes of prefill it protects.
"""

from __future__ import annotations

import logging

from .errors import DataLossError, SessionNotFoundError
from .session_store import open_session_store
from .sessions import Session, session_from_bytes, session_to_bytes

log = logging.getLogger("memserve.sessions")


class DurableSessions:
    def __init__(self, sessions, backend, url: str | None):
        self.sessions = sessions  # sessions.SessionStore: the RAM tier
        self.backend = backend  # kv_memory_backend.KVMemoryAttention: model shape and the tier budget
        self.store = open_session_store(url)
        self.persisted: dict[str, int] = {}  # session id -> version last written
        self.persist_errors = 0
        self.parked_total = 0
        self.loaded_total = 0

    # ---- load ---------------------------------------------------------------------------------
    def _load(self, sid: str) -> Session:
        header, payload = self.store.read(sid)
        try:
            s = session_from_bytes(payload, sid)
        except (SessionNotFoundError, DataLossError):
            raise
        except Exception as e:  # noqa: BLE001 - a verified payload that does not parse: still damage
            raise DataLossError(f"session {sid!r}: snapshot does not parse ({type(e).__name__}: {e}); "
                                "ingest the session again") from None
        lm = s.memory.layers[0]
        if (len(s.memory.layers), lm.hkv, lm.d) != (self.backend.num_layers, self.backend.num_kv_heads,
                                                    self.backend.head_dim):
            raise DataLossError(f"session {sid!r}: snapshot was taken with a model of another shape")
        s.memory.attach_tier(self.backend.tier)  # a loaded session counts against the replica's budget
        s.version = int(header.get("info", {}).get("version", 0))
        self.persisted[sid] = s.version
        self.loaded_total += 1
        return s

    def restore(self, sid: str) -> Session | None:
        """The session as last snapshotted (None: no store, no snapshot, or a damaged one)."""
        if self.store is None:
            return None
        try:
            return self._load(sid)
        except (SessionNotFoundError, DataLossError):
            return None

    def lookup(self, sid: str) -> Session:
        """The session (loaded from the store when not in RAM); SessionNotFoundError / DataLossError."""
        if sid in self.sessions:
            sess = self.sessions.get(sid)
            if self.store is not None and not sess.busy:
                try:
                    stored = int(self.store.header(sid).get("info", {}).get("version", -1))
                except SessionNotFoundError:
                    stored = -1
                if stored > sess.version:  # served by another replica since: its copy is newer
                    sess = self._load(sid)
                    self.sessions.put(sess)
            return sess
        if self.store is None:
            raise SessionNotFoundError(sid)
        sess = self._load(sid)
        self.sessions.put(sess)
        return sess

    # ---- write --------------------------------------------------------------------------------
    def persist(self, sess: Session) -> None:
        """Snapshot `sess` (never raises: a failed write is logged and counted, the RAM copy serves on)."""
        if self.store is None:
            return
        sess.version += 1
        try:
            info = {**sess.info(), "version": sess.version, "busy": False}
            self.store.put(sess.session_id, session_to_bytes(sess), info)
            self.persisted[sess.session_id] = sess.version
        except Exception:  # noqa: BLE001
            self.persist_errors += 1
            log.exception("snapshot of session %r failed; it lives in this replica's RAM only", sess.session_id)

    def flush(self) -> int:
        """Write every idle session whose latest state is not in the store (before a drain)."""
        n = 0
        for s in list(self.sessions.values()):
            if self.store is not None and not s.busy and self.persisted.get(s.session_id) != s.version:
                self.persist(s)
                n += 1
        return n

    def park_one(self, sid: str) -> bool:
        """Free one idle session from RAM, keeping it in the store: the memory-tier budget's parking hook
        (KVMemoryManager.park_session, called by kv_memory/budget.py at its limit). A session whose
        latest state is not in the store is snapshotted first; if that write fails (or there is no
        store, or a request runs on it) it stays in RAM -- a session is never dropped without a snapshot."""
        if self.store is None or sid not in self.sessions:
            return False
        s = self.sessions.get(sid)
        if s.busy:
            return False
        if self.persisted.get(sid) != s.version:
            self.persist(s)
            if self.persisted.get(sid) != s.version:  # the write failed: keep the only copy
                return False
        self.sessions._sessions.pop(sid, None)
        self.parked_total += 1
        return True

    # ---- session API --------------------------------------------------------------------------
    def info(self, sid: str) -> dict:
        if sid in self.sessions:
            return {**self.sessions.get(sid).info(), "resident": True}
        if self.store is None:
            raise SessionNotFoundError(sid)
        info = dict(self.store.header(sid).get("info") or {})
        return {**info, "session_id": sid, "busy": False, "resident": False}

    def delete(self, sid: str) -> None:
        found = False
        if sid in self.sessions:
            self.sessions.delete(sid)  # refuses a busy session
            found = True
        if self.store is not None:
            found = self.store.delete(sid) or found
            self.persisted.pop(sid, None)
        if not found:
            raise SessionNotFoundError(sid)

    def list(self) -> list[dict]:
        out = [{**i, "resident": True} for i in self.sessions.list()]
        if self.store is not None:
            held = {i["session_id"] for i in out}
            for sid in self.store.list():
                if sid in held:
                    continue
                try:
                    out.append(self.info(sid))
                except (SessionNotFoundError, DataLossError) as e:
                    log.warning("listing session %r: %s", sid, e)
        return out

    def resident_ids(self) -> list[str]:
        return [s.session_id for s in self.sessions.values()]

