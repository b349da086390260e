"""Which of a vLLM request's media items the pool may answer for, bound so that no user can forge it.

The front end (`frontend.py`, or the ASGI middleware inside vLLM's API server) computes each item's media
digest from the bytes it actually received and forwards to vLLM, and puts the item into the pool's cache
under the user's tenant. It then sets the item's vLLM identifier (`uuid`, vLLM's `multi_modal_uuids`) to a
*binding*: the tenant, the modality, the digest, the options that change the rows (video sampling, EVS
rate), and an HMAC of all of them under a key only the front end and the connector hold. The connector
fetches rows only for identifiers whose HMAC verifies, from the tenant's namespace the binding names;
anything else (a user's own `uuid`, a bare `sha256:` digest, a forged or altered binding) is not the
pool's, and vLLM's own encoder runs for it.

So a user can never make the connector fetch rows of media they did not send: a binding exists only for
bytes the front end received from that user, and carries that user's tenant. Bindings are never shown
to users (they travel front end -> vLLM only). The tenant in an identifier also keeps vLLM's own caches
(encoder cache, prefix cache) apart between tenants.

Identifier: `encpool1:<tenant>:<modality>:<digest hex>:<sampling>;<pruning rate>:<mac>`, where sampling is
`num_frames,fps,max_frames` (fps as float.hex) and either option is `_` when the request did not set it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path

from encoder_service.client.security import read_secret
from encoder_service.contract.media import DIGEST_PREFIX, MediaDigest, MediaInput, Modality, VideoSampling

PREFIX = "encpool1"
KEY_FILE_ENV = "ENCODER_POOL_BINDING_KEY_FILE"
_TENANT = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAC_HEX = 32


@dataclass(frozen=True)
class Bound:
    """An item the front end bound to a request: what to fetch from the pool, and for whom."""

    tenant: str
    modality: Modality
    digest: str  # sha256:...
    sampling: VideoSampling | None = None
    pruning_rate: float | None = None

    def media(self) -> MediaInput:
        """The item by digest, with its options (part of the pool's cache key)."""
        return MediaInput(self.modality, MediaDigest(self.digest), sampling=self.sampling,
                          pruning_rate=self.pruning_rate)


def tenant_of(api_key: str | None) -> str:
    """The tenant of a user, from the bearer token (API key) the user sent: whoever holds a key is that tenant;
    users without one share the tenant `public`."""
    if not api_key:
        return "public"
    return "u" + hashlib.sha256(b"encoder-pool tenant\0" + api_key.encode()).hexdigest()[:24]


class Binder:
    """Makes and checks bindings with one key (the front end and the connector load the same)."""

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError("the binding key must hold at least 16 bytes")
        self._key = key

    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None) -> "Binder":
        """The key from `path`, else $ENCODER_POOL_BINDING_KEY_FILE (the file's bytes, stripped)."""
        path = path or os.environ.get(KEY_FILE_ENV)
        if not path:
            raise ValueError(f"no binding key: give binding_key_file (or ${KEY_FILE_ENV}), a file holding a "
                             f"secret the front end and vLLM's connector share")
        return cls(read_secret(Path(path), "binding key").strip())

    def bind(self, item: Bound) -> str:
        if not _TENANT.fullmatch(item.tenant):
            raise ValueError(f"a tenant is 1-64 letters, digits, '-' or '_': {item.tenant!r}")
        fields = [PREFIX, item.tenant, item.modality.value, item.digest.removeprefix(DIGEST_PREFIX),
                  _options(item.sampling, item.pruning_rate)]
        return ":".join(fields + [self._mac(fields)])

    def verify(self, identifier: str) -> Bound | None:
        """The binding an identifier carries, or None when it is not one of ours (or is forged)."""
        parts = identifier.split(":") if isinstance(identifier, str) else []
        if len(parts) != 6 or parts[0] != PREFIX:
            return None
        *fields, mac = parts
        if not hmac.compare_digest(mac, self._mac(fields)):
            return None
        _, tenant, modality, digest_hex, options = fields
        try:
            sampling, rate = _parse_options(options)
            return Bound(tenant, Modality(modality), DIGEST_PREFIX + digest_hex, sampling, rate)
        except ValueError:  # a key holder wrote something else: not ours either
            return None

    def _mac(self, fields: list[str]) -> str:
        return hmac.new(self._key, "\x1f".join(fields).encode(), hashlib.sha256).hexdigest()[:_MAC_HEX]


def _options(sampling: VideoSampling | None, rate: float | None) -> str:
    frames = "_" if sampling is None else f"{sampling.num_frames},{float(sampling.fps).hex()},{sampling.max_frames}"
    return f"{frames};{'_' if rate is None else float(rate).hex()}"


def _parse_options(text: str) -> tuple[VideoSampling | None, float | None]:
    frames, rate = text.split(";")
    sampling = None
    if frames != "_":
        n, fps, cap = frames.split(",")
        sampling = VideoSampling(int(n), float.fromhex(fps), int(cap))
    return sampling, (None if rate == "_" else float.fromhex(rate))
