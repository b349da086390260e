"""Generate the gRPC/protobuf Python modules from protos/*.proto.

Kept free of package imports so that setup.py can run it in a bare build
environment. The .proto is mapped to the virtual path `encoder_service/proto/`
so that the generated `*_pb2_grpc.py` imports its messages by absolute package
path (`from encoder_service.proto import encoder_pb2`), with no post-editing.
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_PROTO_DIR = PACKAGE_DIR.parents[1] / "protos"
VIRTUAL_PREFIX = "encoder_service/proto"


def generate(proto_dir: Path = DEFAULT_PROTO_DIR, package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """Run protoc (from grpcio-tools) over every .proto in `proto_dir`; return the written files."""
    import grpc_tools
    from grpc_tools import protoc  # build-time dependency only

    protos = sorted(proto_dir.glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_dir}")
    out_root = package_dir.parents[1]  # .../<root>/encoder_service/proto -> <root>
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{VIRTUAL_PREFIX}={proto_dir}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    written = []
    for p in protos:
        stem = p.stem
        written += [package_dir / f"{stem}_pb2.py", package_dir / f"{stem}_pb2_grpc.py"]
    return written


if __name__ == "__main__":
    for path in generate(*(Path(a) for a in sys.argv[1:])):
        print(path)
