"""The chart's alert rules under Prometheus' own tools: `promtool check rules` on the rendered
PrometheusRule, and `promtool test rules` with a firing and a not-firing case per alert."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from chart_testlib import ROOT, by_kind, render

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")


def _rules_file(tmp_path: Path, *sets: str, annotations: bool = True) -> Path:
    objs, _ = render(sets=sets)
    (rule,) = by_kind(objs, "PrometheusRule")
    if not annotations:  # promtool compares annotations too; the unit tests are about when alerts fire
        for g in rule["spec"]["groups"]:
            for r in g["rules"]:
                r.pop("annotations", None)
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_rendered_rules_pass_promtool_check(tmp_path):
    path = _rules_file(tmp_path)
    p = _promtool("check", "rules", str(path), cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    p = _promtool("check", "rules", str(ROOT / "deploy" / "alerts.yaml"), cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr


def test_every_alert_has_a_firing_unit_test_and_a_runbook(tmp_path):
    rules = yaml.safe_load(_rules_file(tmp_path).read_text())["groups"][0]["rules"]
    cases = yaml.safe_load((Path(__file__).parent / "alerts_test.yaml").read_text())["tests"]
    fired = {t["alertname"] for c in cases for t in c["alert_rule_test"] if t["exp_alerts"]}
    assert {r["alert"] for r in rules} == fired
    assert all(r["annotations"].get("runbook") for r in rules)


def test_alert_unit_tests_pass(tmp_path):
    _rules_file(tmp_path, annotations=False)
    shutil.copy(Path(__file__).parent / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    p = _promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr


def test_unit_tests_fail_when_a_threshold_moves(tmp_path):
    """The unit tests can fail: with the queue threshold raised to 100, 'queue depth' must not fire."""
    _rules_file(tmp_path, "monitoring.prometheusRule.thresholds.queueDepth=100", annotations=False)
    shutil.copy(Path(__file__).parent / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    p = _promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert p.returncode != 0 and "MemServeRequestsWaiting" in p.stdout + p.stderr
