"""Regenerates the committed gRPC stubs from ``proto/etrain.proto``.

``python -m elastictrain.rpc.codegen [OUT_DIR]``. The proto is mapped onto the package path
``elastictrain/rpc`` so the generated modules import each other as
``elastictrain.rpc.etrain_pb2`` (no sys.path tricks). A test checks that regenerating
gives the committed files byte for byte.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO = REPO / "proto" / "etrain.proto"
GENERATED = ("etrain_pb2.py", "etrain_pb2.pyi", "etrain_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-Ielastictrain/rpc={PROTO.parent}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        "elastictrain/rpc/etrain.proto",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + str(PROTO))
    produced = out_dir / "elastictrain" / "rpc"
    return [produced / name for name in GENERATED]


def main() -> int:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "elastictrain" / "rpc"
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            (target / path.name).write_bytes(path.read_bytes())
            print(f"wrote {target / path.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
