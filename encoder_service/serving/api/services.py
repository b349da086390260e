"""The gRPC services an encoder endpoint exposes, the same on the standalone server and on a Ray Serve
pool's proxy: the encoder API, the standard health service (what Kubernetes probes, grpcurl and load
balancers call) and server reflection (what grpcurl lists and describes).

Serve's proxy routes a call by its method's name to the application's deployment, which implements
`Check`, `Watch` and `ServerReflectionInfo` itself (`serve.deployment.EncoderDeployment`), so the services must
be registered with the proxy too (`SERVE_SERVICER_FUNCTIONS`, in deploy/serve_config.yaml).
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from encoder_service.proto import encoder_pb2 as pb

ENCODER_SERVICE = pb.DESCRIPTOR.services_by_name["EncoderService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTED_SERVICES = (ENCODER_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME)
# Health answers for the whole endpoint ("") and for the encoder service by name.
HEALTH_NAMES = ("", ENCODER_SERVICE)

SERVE_SERVICER_FUNCTIONS = [
    "encoder_service.proto.encoder_pb2_grpc.add_EncoderServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
    "grpc_reflection.v1alpha.reflection_pb2_grpc.add_ServerReflectionServicer_to_server",
]


def health_response(serving: bool) -> health_pb2.HealthCheckResponse:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    return health_pb2.HealthCheckResponse(status=status)
