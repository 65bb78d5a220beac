"""kernels/cpp_build.py: build names and the stale-lock rule (a build killed midway must not hang every
later engine in torch's load())."""

import os
import time

from memserve.kernels.cpp_build import STALE_LOCK_S, CppExtension, drop_stale_lock
from torch.utils.cpp_extension import _get_build_directory


def test_stale_lock_removed_fresh_lock_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "memserve_probe" / "lock"
    lock.parent.mkdir()
    lock.touch()
    assert os.path.dirname(lock) == _get_build_directory("memserve_probe", verbose=False)
    drop_stale_lock("memserve_probe")
    assert lock.exists()  # a build may be running right now
    old = time.time() - STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    drop_stale_lock("memserve_probe")
    assert not lock.exists()
    drop_stale_lock("memserve_probe")  # no lock: nothing to do


def test_build_name_follows_source_and_cpu(tmp_path, monkeypatch):
    ext = CppExtension("cpu_decode.cpp", "x", "y", [])
    other = CppExtension("memory_cpu.cpp", "x", "y", [])
    assert ext.name() != other.name() and ext.name().startswith("memserve_cpu_decode_")
    assert ext.name() == CppExtension("cpu_decode.cpp", "x", "y", []).name()


def test_off_switch(monkeypatch):
    ext = CppExtension("memory_cpu.cpp", "x", "y", [], off_env="MEMSERVE_TEST_OFF")
    monkeypatch.setenv("MEMSERVE_TEST_OFF", "0")
    assert ext.load() is None and ext.error() is None
