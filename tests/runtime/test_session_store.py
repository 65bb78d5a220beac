"""runtime/session_store.py: atomic, checksummed, versioned snapshots; damage -> DataLossError."""

import os
import signal
import subprocess
import sys
import time

import pytest
from memserve.runtime import session_store as ss
from memserve.runtime.errors import DataLossError, SessionNotFoundError


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        return ss.open_session_store(str(tmp_path / "store"))
    import uuid
    return ss.open_session_store(f"memory://ms-{uuid.uuid4().hex}")


def test_roundtrip_list_delete(store):
    assert store.list() == []
    store.put("acme:doc1", b"payload-1", {"num_tokens": 3})
    store.put("acme:doc2", b"p2")
    store.put("beta:doc1", b"other tenant")
    store.put("plain", b"no tenant")
    assert store.get("acme:doc1") == b"payload-1"
    assert store.get("beta:doc1") == b"other tenant"
    assert store.header("acme:doc1")["info"] == {"num_tokens": 3}
    assert store.header("acme:doc1")["tenant"] == "acme"
    assert store.list() == ["acme:doc1", "acme:doc2", "beta:doc1", "plain"]
    assert store.list("acme") == ["acme:doc1", "acme:doc2"] and store.list(None) == ["plain"]
    store.put("acme:doc1", b"v2")
    assert store.get("acme:doc1") == b"v2"
    assert store.delete("acme:doc1") and not store.delete("acme:doc1")
    with pytest.raises(SessionNotFoundError):
        store.get("acme:doc1")
    with pytest.raises(SessionNotFoundError):
        store.header("nobody:x")


def test_keys_stay_inside_the_store(tmp_path):
    store = ss.open_session_store(str(tmp_path / "store"))
    assert store._key("acme:doc.1_a-b") == f"{store.root}/acme/doc.1_a-b.snap"
    for sid in ("../../etc/passwd", "a/b", "t:../x", "..", "x\\y", "a:b:c", "sp ace*?[]"):
        store.put(sid, b"x")
        key = store._key(sid)
        assert os.path.realpath(key).startswith(os.path.realpath(store.root) + os.sep), (sid, key)
        assert key.count("/") == store.root.count("/") + 2
        assert store.get(sid) == b"x"
    assert sorted(store.list()) == sorted(("../../etc/passwd", "a/b", "t:../x", "..", "x\\y", "a:b:c", "sp ace*?[]"))
    assert not (tmp_path / "etc").exists()


def _path(store, sid):
    return store._key(sid)


def _rewrite(store, sid, fn):
    blob = store.fs.cat_file(_path(store, sid))
    store.fs.pipe_file(_path(store, sid), fn(blob))


@pytest.mark.parametrize("damage,msg", [
    (lambda b: b[:-5], "truncated"),                                # a cut-off write
    (lambda b: b[:len(ss.MAGIC) + 6], "header"),                    # cut inside the header
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum"),             # one flipped bit in the payload
    (lambda b: b"garbage!" + b[8:], "magic"),
    (lambda b: b"", "magic"),
    (lambda b: b.replace(ss.STORE_FORMAT.encode(), b"memserve.snapshot.v0"), "format"),
])
def test_damaged_snapshots_are_data_loss(store, damage, msg):
    store.put("acme:doc", b"0123456789" * 100)
    _rewrite(store, "acme:doc", damage)
    with pytest.raises(DataLossError, match=msg):
        store.get("acme:doc")
    store.put("acme:doc", b"fresh")  # a new snapshot replaces the damaged one
    assert store.get("acme:doc") == b"fresh"


def test_snapshot_under_another_tenants_key_is_not_found(store):
    store.put("acme:doc", b"secret")
    blob = store.fs.cat_file(_path(store, "acme:doc"))
    store.fs.makedirs(os.path.dirname(_path(store, "evil:doc")), exist_ok=True)
    store.fs.pipe_file(_path(store, "evil:doc"), blob)  # copied into another tenant's folder
    with pytest.raises(SessionNotFoundError):
        store.get("evil:doc")
    with pytest.raises(SessionNotFoundError):
        store.header("evil:doc")


def test_partial_temp_file_leaves_previous_snapshot(tmp_path):
    store = ss.open_session_store(str(tmp_path / "store"))
    store.put("acme:doc", b"good")
    key = _path(store, "acme:doc")
    with open(key + ".tmp-deadbeef", "wb") as f:  # what a writer killed mid-write leaves behind
        f.write(ss.MAGIC + b"\x00\x00")
    assert store.get("acme:doc") == b"good" and store.list() == ["acme:doc"]
    old = time.time() - 3600
    os.utime(key + ".tmp-deadbeef", (old, old))
    store.put("acme:doc", b"better")  # sweeps stale temp files of its key
    assert not os.path.exists(key + ".tmp-deadbeef") and store.get("acme:doc") == b"better"


_WRITER = r"""
import sys
from memserve.runtime.session_store import open_session_store
store = open_session_store(sys.argv[1])
i = 0
while True:
    i += 1
    store.put("acme:doc", bytes([i % 251]) * (8 << 20))   # 8 MiB: a write takes milliseconds
    print(i, flush=True)
"""


def test_sigkill_mid_write_leaves_a_valid_snapshot(tmp_path):
    url = str(tmp_path / "store")
    store = ss.open_session_store(url)
    store.put("acme:doc", b"\x00" * (8 << 20))
    for delay in (0.3, 0.45, 0.6):
        p = subprocess.Popen([sys.executable, "-c", _WRITER, url], stdout=subprocess.PIPE,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert p.stdout.readline()  # at least one write completed
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
        payload = store.get("acme:doc")  # never DataLoss: the old or the new snapshot, whole
        assert len(payload) == 8 << 20 and payload == payload[:1] * len(payload)
    assert store.list() == ["acme:doc"]
