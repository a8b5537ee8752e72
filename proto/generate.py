"""Regenerate the Python code of the API from proto/: ``.venv/bin/python proto/generate.py [OUT_DIR]``.

Writes actstore/v1/actstore_pb2.py, actstore_pb2.pyi and actstore_pb2_grpc.py (into OUT_DIR instead
when given, which the staleness test uses). Needs grpcio-tools (the ``dev`` extra).
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
PROTOS = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
WELL_KNOWN = files("grpc_tools") / "_proto"  # google/protobuf/*.proto (Timestamp), shipped with grpcio-tools


def generate(out_dir: Path = ROOT) -> None:
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{WELL_KNOWN}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
