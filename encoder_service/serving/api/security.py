"""Transport security for the gRPC server and its clients: TLS (optionally mutual) and a bearer token.

Secrets come from files or the environment, never from the command line (where `ps` shows them):
ServerConfig.tls (cert/key files, optional client CA for mTLS), the accepted tokens from `auth_token_file`
(one per line: one per tenant, or old and new while rotating) or $ENCODER_SERVICE_TOKEN (`client.security`
reads both sides' secrets).
A server refuses to listen on a non-loopback address without TLS unless told `insecure`.
Health checks stay open without the token (orchestrators probe them); every other method needs it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass

import grpc

from encoder_service.client.security import read_secret, tokens_from  # noqa: F401 - the server's token list

OPEN_METHODS = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True)
class TLSConfig:
    """Server side: its certificate chain and key (PEM files); a client CA turns on mutual TLS."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        key, cert = read_secret(self.key_file, "TLS key"), read_secret(self.cert_file, "TLS certificate")
        ca = read_secret(self.client_ca_file, "client CA") if self.client_ca_file else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


class TokenCheck(grpc.aio.ServerInterceptor):
    """Server side: every method but the health checks needs `authorization: Bearer <token>`, with one of
    the accepted tokens (each is compared in constant time)."""

    def __init__(self, tokens: list[str]):
        self._expected = [f"Bearer {token}".encode() for token in tokens]

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        if any([hmac.compare_digest(given, expected) for expected in self._expected]):
            return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def deny(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization metadata)")

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def cache_namespace(metadata, isolate: bool = True) -> str:
    """The embedding-cache namespace of a call: one per bearer token (`isolate`), so that a probe by
    digest cannot tell whether another tenant sent an image; "" (shared) without a token or isolation.
    A token is a secret: knowing it is being that tenant."""
    if not isolate:
        return ""
    for key, value in metadata or ():
        if key == "authorization":
            value = value if isinstance(value, bytes) else value.encode()
            return hashlib.sha256(b"encoder-service cache namespace\0" + value).hexdigest()[:32]
    return ""


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine ("" and 0.0.0.0 / [::] do not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
