"""API keys, tenants and per-tenant accounting at the edge (issue 20).

Keys file (`memserve serve --api-keys FILE`, env MEMSERVE_API_KEYS_FILE, AppConfig.api_keys_file):
one `TENANT KEY` pair per line, `#` comments and blank lines ignored; a tenant may have several
keys. Clients send `authorization: Bearer KEY` (gRPC metadata or HTTP header). Without a keys file
every request is tenant "default" (and `memserve serve` binds loopback only).

Comparison is constant-time over *all* keys: each configured key's SHA-256 is compared with the
presented key's SHA-256 by hmac.compare_digest, with no early exit, so neither the position of a
match nor a shared prefix shows in the timing.

Tenant scoping: a client's session id `s` of tenant `t` is `t:s` inside (workers, engine, session
store). ':' is in neither charset (deploy/limits.py), so the mapping is injective and another
tenant's session is, to a caller, exactly an unknown one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from memserve.deploy.limits import DEFAULT_TENANT, TENANT_RE

KEYS_ENV = "MEMSERVE_API_KEYS_FILE"
CLIENT_KEY_ENV = "MEMSERVE_API_KEY"
SEP = ":"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def parse_keys(text: str, source: str = "keys file") -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source}:{n}: expected 'TENANT KEY', got {len(parts)} fields")
        tenant, key = parts
        if not TENANT_RE.fullmatch(tenant):
            raise ValueError(f"{source}:{n}: tenant {tenant!r} must match [A-Za-z0-9_-]+")
        if len(key) < 16:
            raise ValueError(f"{source}:{n}: key of tenant {tenant!r} is {len(key)} characters; use at least 16 "
                             "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        out.append((tenant, _digest(key)))
    if not out:
        raise ValueError(f"{source}: no 'TENANT KEY' lines")
    return out


class ApiKeys:
    """None of them configured = open (tenant "default")."""

    def __init__(self, entries: list[tuple[str, bytes]] | None = None):
        self.entries = entries or []

    @classmethod
    def from_file(cls, path: str | os.PathLike | None) -> "ApiKeys":
        if not path:
            return cls()
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"api keys file {str(p)!r}: {e.strerror or e}") from None
        return cls(parse_keys(text, str(p)))

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def tenants(self) -> list[str]:
        return sorted({t for t, _ in self.entries})

    def authenticate(self, authorization: str | None) -> str:
        """The tenant of an `authorization` value ("Bearer KEY"), or RpcError(UNAUTHENTICATED)."""
        from memserve.deploy.ingress import RpcError

        if not self.entries:
            return DEFAULT_TENANT
        if not authorization:
            raise RpcError("UNAUTHENTICATED", "authorization: missing; send metadata 'authorization: Bearer KEY' "
                           "(memserve generate --api-key / env MEMSERVE_API_KEY; HTTP header Authorization)")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise RpcError("UNAUTHENTICATED", "authorization: expected 'Bearer KEY'")
        d = _digest(key.strip())
        found = None
        for tenant, ref in self.entries:  # no early exit: every key is compared
            if hmac.compare_digest(d, ref):
                found = tenant
        if found is None:
            raise RpcError("UNAUTHENTICATED", "authorization: unknown API key")
        return found


def metadata_value(metadata, name: str = "authorization") -> str | None:
    for k, v in metadata or ():
        if k.lower() == name:
            return v.decode() if isinstance(v, bytes) else v
    return None


def internal_id(tenant: str, session_id: str) -> str:
    return f"{tenant}{SEP}{session_id}"


def client_id(internal: str) -> str:
    return internal.partition(SEP)[2] or internal


def tenant_of(internal: str) -> str | None:
    t, sep, _ = internal.partition(SEP)
    return t if sep else None


class TenantBook:
    """Per-tenant accounting of one ingress replica: open streams, known sessions, memory bytes.

    Sessions are learnt from what passes the edge (a Generate/Ingest that opened one, a
    DeleteSession, a NOT_FOUND) and from the engine replicas' listings when the ingress asks
    (`seed`), so the quota holds across ingress restarts once a listing came in."""

    def __init__(self):
        self.streams: dict[str, int] = {}
        self.sessions: dict[str, dict[str, int]] = {}  # tenant -> {client session id: memory bytes}

    def open_stream(self, tenant: str, limit: int) -> None:
        from memserve.deploy.limits import over

        n = self.streams.get(tenant, 0)
        if n >= limit:
            raise over("RESOURCE_EXHAUSTED", "streams", "max_streams_per_tenant", limit, n + 1,
                       f" concurrent streams of tenant {tenant!r}")
        self.streams[tenant] = n + 1

    def close_stream(self, tenant: str) -> None:
        n = self.streams.get(tenant, 0) - 1
        if n > 0:
            self.streams[tenant] = n
        else:
            self.streams.pop(tenant, None)

    def has(self, tenant: str, session_id: str) -> bool:
        return session_id in self.sessions.get(tenant, {})

    def check_new_session(self, tenant: str, session_id: str, max_sessions: int, max_bytes: int | None) -> None:
        from memserve.deploy.limits import over

        mine = self.sessions.get(tenant, {})
        if session_id in mine:
            return
        if len(mine) >= max_sessions:
            raise over("RESOURCE_EXHAUSTED", "session_id", "max_sessions_per_tenant", max_sessions, len(mine) + 1,
                       f" sessions of tenant {tenant!r} (delete one with DeleteSession)")
        self.check_bytes(tenant, max_bytes)

    def check_bytes(self, tenant: str, max_bytes: int | None) -> None:
        from memserve.deploy.limits import fail

        if max_bytes is None:
            return
        used = sum(self.sessions.get(tenant, {}).values())
        if used >= max_bytes:
            raise fail("RESOURCE_EXHAUSTED", "session_id",
                       f"tenant {tenant!r} holds {used} memory-tier bytes, at most {max_bytes} (limit "
                       "max_memory_bytes_per_tenant); delete a session with DeleteSession")

    def add(self, tenant: str, session_id: str, nbytes: int | None = None) -> None:
        mine = self.sessions.setdefault(tenant, {})
        mine[session_id] = int(nbytes if nbytes is not None else mine.get(session_id, 0))

    def forget(self, tenant: str, session_id: str) -> None:
        mine = self.sessions.get(tenant)
        if mine is not None:
            mine.pop(session_id, None)
            if not mine:
                self.sessions.pop(tenant, None)
