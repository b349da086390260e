"""Transport security for the gRPC server and its clients: TLS (optionally mutual) and a bearer token.

Secrets come from files or the environment, never from the command line (where `ps` shows them):
ServerConfig.tls (cert/key files, optional client CA for mTLS), the accepted tokens from `auth_token_file`
(one per line: one per tenant, or old and new while rotating) or $ENCODER_SERVICE_TOKEN (`client.security`
reads both sides' secrets).
A server refuses to listen on a non-loopback address without TLS unless told `insecure`.
Health checks and reflection stay open without the token (orchestrators probe them; the API's shape is
public); every other method needs it, on every door (`Authenticator`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass

import grpc

from encoder_service.client.security import read_secret, tokens_from  # noqa: F401 - the server's token list
from encoder_service.contract.errors import Unauthenticated
from encoder_service.contract.wire.metadata import TENANT_KEY

# Open on every door: health checks (orchestrators probe them) and reflection (the API's shape, which is public).
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


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
class Identity:
    """Who a call is, as far as the pool can tell: its cache namespace (`namespace`: rows are kept and found
    per namespace) and a short label for logs and metrics (never the secret)."""

    namespace: str
    label: str


def _digest(*parts: bytes) -> str:
    return hashlib.sha256(b"\0".join([b"encoder-service cache namespace", *parts])).hexdigest()[:32]


class Authenticator:
    """The one identity check of every door (standalone gRPC, Serve's gRPC proxy, the Serve handle).

    gRPC calls (`identify`): with tokens configured, exactly one `authorization: Bearer <token>` header
    holding one of them (compared in constant time) is required (UNAUTHENTICATED otherwise: missing, wrong
    or more than one); the namespace derives from that verified token only, optionally refined by a `tenant`
    header *inside* it (a front end keeping its own users apart: it cannot reach another token's entries).
    Without tokens the pool is open and every caller is the anonymous tenant (a `tenant` header still splits
    namespaces, unverified). Health checks need no token (the doors do not ask).

    Handle calls (`identify_handle`), from inside the Ray cluster: the caller names its tenant; with tokens
    configured, a call that names none is refused unless `trust_cluster` is on.

    `shared_cache`: one namespace for everybody (tokens still verified): any caller can then learn whether
    an image was ever sent (cache hits, latency) and fetch another's rows by digest.
    """

    def __init__(self, tokens: list[str], shared_cache: bool = False, trust_cluster: bool = False):
        self._expected = [f"Bearer {token}".encode() for token in tokens]
        self.shared_cache, self.trust_cluster = shared_cache, trust_cluster

    @property
    def required(self) -> bool:
        return bool(self._expected)

    def identify(self, metadata) -> Identity:
        given = [v if isinstance(v, bytes) else v.encode() for k, v in metadata or () if k == "authorization"]
        tenant = "".join(v if isinstance(v, str) else v.decode() for k, v in metadata or () if k == TENANT_KEY)
        if len(given) > 1:
            raise Unauthenticated("more than one authorization header")
        if self._expected:
            if not given or not any([hmac.compare_digest(given[0], expected) for expected in self._expected]):
                raise Unauthenticated("missing or wrong bearer token (authorization metadata)")
            return self._identity(b"token", given[0], tenant)
        return self._identity(b"anonymous", b"", tenant)

    def identify_handle(self, tenant: str) -> Identity:
        if not tenant and self._expected and not self.trust_cluster:
            raise Unauthenticated("this deployment requires handle calls to name their tenant (or trust_cluster)")
        return self._identity(b"handle", tenant.encode(), "")

    def _identity(self, kind: bytes, secret: bytes, tenant: str) -> Identity:
        if self.shared_cache:
            return Identity("", "shared")
        namespace = _digest(kind, secret, tenant.encode())
        return Identity(namespace, f"{kind.decode()}:{namespace[:8]}")


class TokenCheck(grpc.aio.ServerInterceptor):
    """The standalone server's door to the `Authenticator`: every method but the health checks (the
    encoder's, and reflection) is refused with UNAUTHENTICATED unless its call's metadata identifies."""

    def __init__(self, auth: Authenticator):
        self.auth = auth

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        try:
            self.auth.identify(details.invocation_metadata)
        except Unauthenticated as e:
            return _refusal(handler, str(e))
        return handler


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def deny(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine ("" and 0.0.0.0 / [::] do not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
