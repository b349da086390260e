"""Generated protobuf/gRPC modules for protos/encoder.proto.

The modules are produced by `encoder_service.proto.codegen` when the package
is built or installed. A plain source checkout that was never installed gets
them generated on first import (needs grpcio-tools).
"""

from __future__ import annotations

try:
    from encoder_service.proto import encoder_pb2, encoder_pb2_grpc
except ImportError:  # never built: generate from protos/ next to the package
    from encoder_service.proto import codegen

    codegen.generate()
    from encoder_service.proto import encoder_pb2, encoder_pb2_grpc

__all__ = ["encoder_pb2", "encoder_pb2_grpc"]
