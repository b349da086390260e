"""Transport security for the gRPC server and its clients: TLS (optionally mutual) and a bearer token.

Secrets come from files or the environment, never from the command line (where `ps` shows them):
  server: ServerConfig.tls (cert/key files, optional client CA for mTLS), the accepted tokens from
          `auth_token_file` (one per line: one per tenant, or old and new while rotating) or
          $ENCODER_SERVICE_TOKEN;
  client: ClientSecurity.from_env() reads $ENCODER_SERVICE_CA, $ENCODER_SERVICE_CLIENT_CERT,
          $ENCODER_SERVICE_CLIENT_KEY and $ENCODER_SERVICE_TOKEN (or $ENCODER_SERVICE_TOKEN_FILE).
A server refuses to listen on a non-loopback address without TLS unless told `insecure`.
Health checks stay open without the token (orchestrators probe them); every other method needs it.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

TOKEN_ENV, TOKEN_FILE_ENV = "ENCODER_SERVICE_TOKEN", "ENCODER_SERVICE_TOKEN_FILE"
OPEN_METHODS = ("/grpc.health.v1.Health/",)


def read_secret(path: str | Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the {what} file {str(path)!r}: {e.strerror}") from None
    if not data.strip():
        raise ValueError(f"the {what} file {str(path)!r} is empty")
    return data


def tokens_from(path: str | None = None) -> list[str]:
    """Bearer tokens from `path` (one per line; blank and '#' lines skipped), else
    $ENCODER_SERVICE_TOKEN_FILE, else $ENCODER_SERVICE_TOKEN; [] when none is configured."""
    path = path or os.environ.get(TOKEN_FILE_ENV)
    if path:
        lines = read_secret(path, "token").decode().splitlines()
        tokens = [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]
        if not tokens:
            raise ValueError(f"the token file {str(path)!r} holds no token")
        return tokens
    return [os.environ[TOKEN_ENV]] if os.environ.get(TOKEN_ENV) else []


def token_from(path: str | None = None) -> str | None:
    """A client's bearer token (the first of `tokens_from`)."""
    tokens = tokens_from(path)
    return tokens[0] if tokens else None


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


@dataclass(frozen=True)
class ClientSecurity:
    """Client side: a CA to verify the server (TLS on), a client certificate for mTLS, a token."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = None
    server_name: str | None = None  # the name in the server's certificate, if not the address's host

    @classmethod
    def from_env(cls) -> "ClientSecurity":
        env = os.environ.get
        return cls(env("ENCODER_SERVICE_CA"), env("ENCODER_SERVICE_CLIENT_CERT"), env("ENCODER_SERVICE_CLIENT_KEY"),
                   token_from(), env("ENCODER_SERVICE_SERVER_NAME"))

    def channel(self, address: str, options: list[tuple[str, int]]) -> grpc.Channel:
        if self.ca_file:
            creds = grpc.ssl_channel_credentials(
                root_certificates=read_secret(self.ca_file, "CA"),
                private_key=read_secret(self.key_file, "client key") if self.key_file else None,
                certificate_chain=read_secret(self.cert_file, "client certificate") if self.cert_file else None,
            )
            extra = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
            channel = grpc.secure_channel(address, creds, options=options + extra)
        else:
            channel = grpc.insecure_channel(address, options=options)
        if self.token:
            channel = grpc.intercept_channel(channel, _BearerToken(self.token))
        return channel


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                            "compression")),
    grpc.ClientCallDetails,
):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a channel."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation, details, request):
        metadata = list(details.metadata or []) + [self._header]
        return continuation(_CallDetails(details.method, details.timeout, metadata, details.credentials,
                                         details.wait_for_ready, details.compression), request)


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
