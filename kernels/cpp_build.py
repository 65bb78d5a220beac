"""Building the CPU kernels' C++ extensions (cpu_decode, cpu_decode_batched, memory_cpu) on first use with
torch's extension builder: one place for what every build needs.

* The build name carries a hash of the CPU's flags (the builds use -march=native, so a cache shared between
  machines must not hand one CPU's binary to another) and of the source (worktrees or versions sharing one
  `~/.cache/torch_extensions` each get their own build directory instead of rebuilding over each other).
* torch's builder runs `ninja` from PATH; the `ninja` wheel (a dependency) puts it in the venv's bin, which is
  not on PATH when the venv's python runs without activation (`.venv/bin/python -m pytest`, Ray workers).
  Without it a machine with no system ninja silently fell back to the torch paths.
* torch's builder waits forever on its build directory's `lock` file; a build killed midway (a test timeout)
  left one behind and every later engine on the machine hung in load() (seen twice on 2026-12-07). A build
  takes ~20-60 s here, so a lock older than 10 minutes is a dead one and is removed.
* No compiler or headers: `load()` returns None once, logs why, and `error()` says it; callers keep their
  torch paths.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)
STALE_LOCK_S = 600.0


def cpu_tag() -> str:
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def ninja_on_path() -> None:
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def drop_stale_lock(name: str, max_age_s: float = STALE_LOCK_S) -> None:
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    try:
        if time.time() - lock.stat().st_mtime > max_age_s:
            log.warning("removing a stale build lock %s", lock)
            lock.unlink()
    except FileNotFoundError:
        pass


class CppExtension:
    """One C++ source of kernels/, built once per process on first `load()`."""

    def __init__(self, source: str, what: str, fallback: str, cflags: list[str], off_env: str | None = None):
        self.src = Path(__file__).with_name(source)
        self.what, self.fallback, self.cflags, self.off_env = what, fallback, cflags, off_env
        self._lock = threading.Lock()
        self._mod = None
        self._error: str | None = None

    def name(self) -> str:
        h = hashlib.sha1(self.src.read_bytes() + " ".join(self.cflags).encode()).hexdigest()[:8]
        return f"memserve_{self.src.stem}_{cpu_tag()}_{h}"

    def load(self):
        """The compiled module, or None if it cannot be built here (the reason in `error()`) or `off_env`=0."""
        if self.off_env and os.environ.get(self.off_env, "1") == "0":
            return None
        if self._mod is not None or self._error is not None:
            return self._mod
        with self._lock:
            if self._mod is None and self._error is None:
                try:
                    from torch.utils.cpp_extension import load

                    ninja_on_path()
                    name = self.name()
                    drop_stale_lock(name)
                    log.info("building the %s (first use on this machine, ~1 min)", self.what)
                    self._mod = load(name=name, sources=[str(self.src)], extra_cflags=self.cflags, verbose=False)
                except Exception as e:  # noqa: BLE001 - no compiler / headers: the torch paths still work
                    msg = str(e).strip()
                    self._error = f"{type(e).__name__}: {msg.splitlines()[-1] if msg else ''}"
                    log.warning("%s unavailable, %s: %s", self.what, self.fallback, self._error)
            return self._mod

    def error(self) -> str | None:
        return self._error
