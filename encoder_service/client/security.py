"""A client's transport security: TLS (optionally mutual) and a bearer token, from files or the environment,
never from the command line (where `ps` shows them): `ClientSecurity.from_env()` reads $ENCODER_SERVICE_CA,
$ENCODER_SERVICE_CLIENT_CERT, $ENCODER_SERVICE_CLIENT_KEY and $ENCODER_SERVICE_TOKEN (or
$ENCODER_SERVICE_TOKEN_FILE). The same token files configure a server's accepted tokens (`tokens_from`).
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

TOKEN_ENV, TOKEN_FILE_ENV = "ENCODER_SERVICE_TOKEN", "ENCODER_SERVICE_TOKEN_FILE"


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
class ClientSecurity:
    """Client side: a CA to verify the server (TLS on), a client certificate for mTLS, a token."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token: str | None = None
    server_name: str | None = None  # the name in the server's certificate, if not the address's host

    @classmethod
    def from_env(cls, token_file: str | None = None) -> "ClientSecurity":
        """TLS settings and the token from the environment; `token_file`: the token from this file instead."""
        env = os.environ.get
        return cls(env("ENCODER_SERVICE_CA"), env("ENCODER_SERVICE_CLIENT_CERT"), env("ENCODER_SERVICE_CLIENT_KEY"),
                   token_from(token_file), env("ENCODER_SERVICE_SERVER_NAME"))

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


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a channel (Encode and EncodeStream alike)."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details) -> _CallDetails:
        metadata = list(details.metadata or []) + [self._header]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready,
                            details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)
