"""Keep deploy/ and the chart's monitoring in one source.

- deploy/alerts.yaml (for Prometheus outside Kubernetes) is the chart's PrometheusRule rendered with
  the default values: the rules live once, in templates/_alerts.tpl, with thresholds from values.
- helm/memserve/files/dashboards/ is a copy of deploy/dashboards/ (Helm cannot read outside the chart).

    python helm/sync_monitoring.py           # rewrite both
    python helm/sync_monitoring.py --check   # exit 1 if either is stale (tests/helm runs it)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "memserve"
ALERTS = ROOT / "deploy" / "alerts.yaml"
HEADER = ("# Prometheus alert rules for memserve, generated from helm/memserve/templates/_alerts.tpl with the\n"
          "# chart's default thresholds by helm/sync_monitoring.py (do not edit; edit the template).\n"
          "# Check: promtool check rules deploy/alerts.yaml\n")


def helm_bin() -> str:
    local = Path(sys.executable).parent / "helm"
    return str(local) if local.exists() else (shutil.which("helm") or "helm")


def alerts_text() -> str:
    out = subprocess.run([helm_bin(), "template", "memserve", str(CHART), "--show-only",
                          "templates/prometheusrule.yaml"], check=True, capture_output=True, text=True).stdout
    rule = yaml.safe_load(out)
    return HEADER + yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False, width=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    stale = []
    text = alerts_text()
    if not ALERTS.exists() or ALERTS.read_text() != text:
        stale.append(str(ALERTS))
        if not args.check:
            ALERTS.write_text(text)
    src, dst = ROOT / "deploy" / "dashboards", CHART / "files" / "dashboards"
    names = sorted(os.listdir(src))
    if sorted(os.listdir(dst)) != names or any((src / n).read_bytes() != (dst / n).read_bytes() for n in names):
        stale.append(str(dst))
        if not args.check:
            shutil.rmtree(dst)
            shutil.copytree(src, dst)
    if args.check and stale:
        sys.exit(f"stale: {', '.join(stale)}: run python helm/sync_monitoring.py")
    if not args.check:
        print("in sync" if not stale else f"rewrote {', '.join(stale)}")


if __name__ == "__main__":
    main()
