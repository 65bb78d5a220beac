"""Helpers for the chart tests: the real `helm` binary (helm/get_helm.py puts it into the venv)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "memserve"
VALUES = ROOT / "helm" / "values"


def helm_bin() -> str:
    local = Path(sys.executable).parent / "helm"
    found = str(local) if local.exists() else shutil.which("helm")
    if not found:
        pytest.fail("helm binary not found: run `python helm/get_helm.py --dest .venv/bin` (make setup does)")
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([helm_bin(), *args], capture_output=True, text=True, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{p.stderr}")
    return p


def render(*values_files: str, sets: tuple[str, ...] = (), release: str = "memserve", check: bool = True):
    """Render the chart; returns (objects, CompletedProcess)."""
    args = ["template", release, str(CHART), "--namespace", "llm"]
    for f in values_files:
        args += ["-f", str(VALUES / f) if not Path(f).is_absolute() else f]
    for s in sets:
        args += ["--set", s]
    p = helm(*args, check=check)
    objs = [o for o in yaml.safe_load_all(p.stdout) if o] if p.returncode == 0 else []
    return objs, p


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]
