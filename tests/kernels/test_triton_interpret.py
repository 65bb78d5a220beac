"""Runs the Triton kernel cases (test_triton_cases.py) under TRITON_INTERPRET=1 in a fresh process:
Triton decides interpreter mode for its own jitted library functions at import time, and the
normal session has imported it already."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this session runs the cases directly")
def test_triton_kernels_in_interpreter():
    cases = Path(__file__).with_name("test_triton_cases.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(cases)],
                       env=env, capture_output=True, text=True, timeout=840, cwd=Path(__file__).parents[2])
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "skipped" not in r.stdout.split("\n")[-2], tail
