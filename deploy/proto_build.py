"""Regenerate the gRPC stubs from deploy/memserve.proto.

    make proto        # or: .venv/bin/python -m memserve.deploy.proto_build

Writes deploy/memserve_pb2.py and deploy/memserve_pb2_grpc.py (committed, so
users need no grpcio-tools). protoc emits `import memserve_pb2` in the _grpc module, a top-level
import that only works with deploy/ on sys.path; it is rewritten to the package import
`from memserve.deploy import memserve_pb2`, and the module name protoc bakes into the message
classes ('memserve_pb2') becomes 'memserve.deploy.memserve_pb2' so they pickle (the Serve proxy
pickles requests on their way to the ingress replica).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

DEPLOY_DIR = Path(__file__).resolve().parent
PROTO = DEPLOY_DIR / "memserve.proto"


def build(out_dir: Path = DEPLOY_DIR) -> list[Path]:
    try:
        from grpc_tools import protoc
    except ImportError as e:  # pragma: no cover - message only
        raise SystemExit("grpcio-tools is missing: pip install 'grpcio-tools>=1.60' (in .[test])") from e
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO.parent}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}: {' '.join(args)}")
    # The message classes' __module__ must be the importable package path: the Serve proxy
    # pickles request messages to send them to the ingress replica.
    pb2_file = out_dir / "memserve_pb2.py"
    pb2 = pb2_file.read_text()
    pb2 = pb2.replace("_globals, 'memserve_pb2'", "_globals, 'memserve.deploy.memserve_pb2'")
    pb2 = pb2.replace("(DESCRIPTOR, 'memserve_pb2',", "(DESCRIPTOR, 'memserve.deploy.memserve_pb2',")
    pb2_file.write_text(pb2)
    grpc_file = out_dir / "memserve_pb2_grpc.py"
    text = grpc_file.read_text()
    text = re.sub(r"^import memserve_pb2 as", "from memserve.deploy import memserve_pb2 as", text, flags=re.M)
    grpc_file.write_text(text)
    return [pb2_file, grpc_file]


def main() -> None:
    for p in build():
        print(f"wrote {p}")


if __name__ == "__main__":
    sys.exit(main())
