"""Durable session snapshots behind one interface, addressed by URL through fsspec.

    store = open_session_store("file:///var/lib/memserve/sessions")   # or a plain path, s3://..., memory://...
    store.put("acme:doc1", payload, info)    # atomic; payload = sessions.session_to_bytes(session)
    store.get("acme:doc1")                   # -> bytes (checksum verified), DataLossError / SessionNotFoundError
    store.list()                             # -> ["acme:doc1", ...]: what a restarted replica can serve

Session ids reaching the engine are internal ids `f"{tenant}:{client_id}"` (deploy/ checks the charsets:
tenant [A-Za-z0-9_-]+, client id [A-Za-z0-9._-]{1,128}); an id without ':' has no tenant (offline use).
Each id maps to the key `<tenant>/<client_id>.snap` (`@none/` without tenant: '@' is outside the tenant
charset, so it can never collide with a tenant's folder). Other characters (offline callers may use any
id) are percent-encoded, so no id can name a path outside the store; `_key` asserts it.

File layout (one object per session):
    MAGIC (8 bytes) | u32 big-endian header length | header JSON | payload
    header = {"format": STORE_FORMAT, "tenant", "session_id", "sha256" (of payload), "bytes", "info"}
A reader refuses (DataLossError) a wrong magic, an unparsable header, another format version, a payload
shorter or longer than `bytes` (truncated write), or a checksum mismatch. A snapshot whose header names
another session or tenant than its key reads as absent (SessionNotFoundError): no existence leak.

Atomicity: on a local filesystem the snapshot is written to a temp file beside the key, fsync'ed, then
renamed over it (rename is atomic on POSIX), so a kill mid-write leaves the previous snapshot intact
and at worst a stray `*.tmp-*` file, which `list` ignores and the next `put` of the key sweeps.
Object stores (s3, gcs) commit a PUT atomically: the object is written in one request
(write-then-commit), never visible half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
import uuid
from urllib.parse import quote, unquote

from .errors import DataLossError, SessionNotFoundError

MAGIC = b"MSSNAP\x00\x01"
STORE_FORMAT = "memserve.snapshot.v1"
SUFFIX = ".snap"
NO_TENANT = "@none"
_SAFE = re.compile(r"[A-Za-z0-9._~%-]+")
_MAX_HEADER = 1 << 20


def split_id(session_id: str) -> tuple[str | None, str]:
    """Internal id -> (tenant or None, client id)."""
    tenant, sep, client = session_id.partition(":")
    return (tenant, client) if sep else (None, session_id)


def encode(header: dict, payload: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(h)) + h + payload


def decode(blob: bytes, where: str) -> tuple[dict, bytes]:
    """(header, payload) of a snapshot object, verified; DataLossError naming `where` otherwise."""
    header, off = decode_header(blob, where)
    payload = blob[off:]
    if len(payload) != header["bytes"]:
        raise DataLossError(f"{where}: snapshot truncated or padded ({len(payload)} payload bytes, header says "
                            f"{header['bytes']}); the session must be ingested again")
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise DataLossError(f"{where}: snapshot checksum mismatch (sha256); the session must be ingested again")
    return header, payload


def decode_header(blob: bytes, where: str) -> tuple[dict, int]:
    if blob[:len(MAGIC)] != MAGIC:
        raise DataLossError(f"{where}: not a memserve session snapshot (bad magic; truncated or overwritten)")
    if len(blob) < len(MAGIC) + 4:
        raise DataLossError(f"{where}: snapshot truncated inside its header")
    (n,) = struct.unpack(">I", blob[len(MAGIC):len(MAGIC) + 4])
    off = len(MAGIC) + 4 + n
    if n > _MAX_HEADER or len(blob) < off:
        raise DataLossError(f"{where}: snapshot truncated inside its header")
    try:
        header = json.loads(blob[len(MAGIC) + 4:off])
        fmt = header["format"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataLossError(f"{where}: snapshot header unreadable ({e})") from None
    if fmt != STORE_FORMAT:
        raise DataLossError(f"{where}: snapshot format {fmt!r}, this memserve reads {STORE_FORMAT!r}; "
                            "ingest the session again (or read it with the memserve version that wrote it)")
    if not isinstance(header.get("bytes"), int) or not isinstance(header.get("sha256"), str):
        raise DataLossError(f"{where}: snapshot header lacks its size / checksum")
    return header, off


class SessionSnapshotStore:
    """The one interface every backend is reached through (fsspec: local, memory://, s3://, gs://, ...)."""

    def __init__(self, url: str):
        import fsspec

        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")
        self.local = "file" in _protocols(self.fs)
        self.fs.makedirs(self.root, exist_ok=True)

    # ---- keys ---------------------------------------------------------------------------------
    def _key(self, session_id: str) -> str:
        tenant, client = split_id(session_id)
        t = NO_TENANT if tenant is None else quote(tenant, safe="")
        c = quote(client, safe="")
        assert client and _SAFE.fullmatch(c) and (tenant is None or (tenant and _SAFE.fullmatch(t))), \
            f"session id {session_id!r} cannot be mapped to a store key"
        return f"{self.root}/{t}/{c}{SUFFIX}"

    def _id_of(self, key: str) -> str | None:
        parts = key.rstrip("/").split("/")
        if len(parts) < 2 or not parts[-1].endswith(SUFFIX):
            return None
        t, c = parts[-2], unquote(parts[-1][:-len(SUFFIX)])
        return c if t == NO_TENANT else f"{unquote(t)}:{c}"

    # ---- the interface ------------------------------------------------------------------------
    def put(self, session_id: str, payload: bytes, info: dict | None = None) -> int:
        """Write the snapshot of `session_id` atomically; returns the bytes written."""
        tenant, _ = split_id(session_id)
        header = {"format": STORE_FORMAT, "tenant": tenant, "session_id": session_id,
                  "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload),
                  "written": time.time(), "info": info or {}}
        blob = encode(header, payload)
        key = self._key(session_id)
        if self.local:
            _atomic_local_write(key, blob)
        else:  # object stores: one PUT, committed atomically
            self.fs.pipe_file(key, blob)
        return len(blob)

    def _read(self, session_id: str, header_only: bool = False) -> bytes:
        key = self._key(session_id)
        try:
            if header_only:
                with self.fs.open(key, "rb") as f:
                    head = f.read(len(MAGIC) + 4)
                    n = struct.unpack(">I", head[len(MAGIC):])[0] if len(head) == len(MAGIC) + 4 else 0
                    return head + f.read(min(n, _MAX_HEADER))
            return self.fs.cat_file(key)
        except FileNotFoundError:
            raise SessionNotFoundError(session_id) from None

    def _own(self, session_id: str, header: dict) -> None:
        tenant, _ = split_id(session_id)
        if header.get("session_id") != session_id or header.get("tenant") != tenant:
            # a snapshot copied under another tenant's / session's key: answer as if absent
            raise SessionNotFoundError(session_id)

    def read(self, session_id: str) -> tuple[dict, bytes]:
        """(header, verified payload); SessionNotFoundError if absent, DataLossError if damaged."""
        header, payload = decode(self._read(session_id), f"session {session_id!r}")
        self._own(session_id, header)
        return header, payload

    def get(self, session_id: str) -> bytes:
        return self.read(session_id)[1]

    def header(self, session_id: str) -> dict:
        """The snapshot's header (its `info` describes the session) without reading the payload."""
        blob = self._read(session_id, header_only=True)
        header, _ = decode_header(blob, f"session {session_id!r}")
        self._own(session_id, header)
        return header

    def exists(self, session_id: str) -> bool:
        return self.fs.exists(self._key(session_id))

    def delete(self, session_id: str) -> bool:
        try:
            self.fs.rm_file(self._key(session_id))
            return True
        except FileNotFoundError:
            return False

    def list(self, tenant: str | None = ...) -> list[str]:  # type: ignore[assignment]
        """Session ids in the store (all, or one tenant's: None = the untenanted ones)."""
        pattern = f"{self.root}/*/*{SUFFIX}" if tenant is ... else \
            f"{self.root}/{NO_TENANT if tenant is None else quote(tenant, safe='')}/*{SUFFIX}"
        ids = (self._id_of(k) for k in self.fs.glob(pattern))
        return sorted(i for i in ids if i is not None)


def _protocols(fs) -> tuple:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _atomic_local_write(path: str, blob: bytes) -> None:
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see the old snapshot or the new one, never a mix
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise
    with _suppress():  # the rename itself durable across a power cut
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    base = os.path.basename(path) + ".tmp-"
    with _suppress():  # temp files of writers killed mid-write (never the snapshot); a minute old, so
        now = time.time()  # a concurrent writer's live temp file is left alone
        for name in os.listdir(d):
            p = os.path.join(d, name)
            if name.startswith(base) and now - os.stat(p).st_mtime > 60:
                os.unlink(p)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


def open_session_store(url: str | None) -> SessionSnapshotStore | None:
    """None (no durability) for None / ""; a plain path means a local directory."""
    if not url:
        return None
    return SessionSnapshotStore(url)
