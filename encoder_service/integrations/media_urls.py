"""Media URLs as LLM servers' requests carry them, read the same way by every integration: data: URLs decoded,
http(s) URLs downloaded (bounded, no redirects) from hosts a user may name. A URL in a user's request must
not make a front end inside the cluster fetch from the cluster's own network: hosts that resolve to private,
loopback, link-local or reserved addresses are refused unless the deployment allows them, and redirects are
not followed (one could lead past that check)."""

from __future__ import annotations

import asyncio
import binascii
import ipaddress
from urllib.parse import urlsplit

from aiohttp import ClientError, ClientSession, ClientTimeout

try:  # SIMD base64 where installed (vLLM's environment has it)
    import pybase64 as _base64
except ImportError:  # pragma: no cover - depends on the environment
    import base64 as _base64


class BadMedia(ValueError):
    """A media URL or its data cannot be used: the request that carries it is answered 400."""


def decode_data_url(url: str) -> bytes:
    """The bytes of a base64 `data:` URL."""
    try:
        header, payload = url.split(",", 1)
        if not header.endswith(";base64"):
            raise BadMedia("a data URL must be base64")
        return _base64.b64decode(payload, validate=True)
    except (ValueError, binascii.Error) as e:
        if isinstance(e, BadMedia):
            raise
        raise BadMedia(f"undecodable data URL: {e}") from None


async def check_media_host(url: str, allowed: list[str], allow_private: bool) -> None:
    """Refuse an http(s) URL whose host is not in `allowed` (when given), or that resolves to a non-public
    address (unless `allow_private`)."""
    host = urlsplit(url).hostname
    if not host:
        raise BadMedia(f"no host in {url[:100]!r}")
    if allowed and not any(host == d or host.endswith("." + d) for d in allowed):
        raise BadMedia(f"media from {host} are not allowed here")
    if allow_private:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None)
    except OSError as e:
        raise BadMedia(f"cannot resolve {host}: {e}") from None
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if not address.is_global:
            raise BadMedia(f"{host} resolves to a non-public address ({address}): not fetched")


async def download(session: ClientSession, url: str, max_bytes: int, timeout_s: float) -> bytes:
    """An http(s) media URL's bytes, at most `max_bytes`; call `check_media_host` first."""
    try:
        async with session.get(url, timeout=ClientTimeout(total=timeout_s), allow_redirects=False) as response:
            if response.status != 200:
                raise BadMedia(f"fetching {url} answered HTTP {response.status}")
            data = await response.content.read(max_bytes + 1)
    except (OSError, asyncio.TimeoutError, ClientError, ValueError) as e:
        if isinstance(e, BadMedia):
            raise
        raise BadMedia(f"fetching {url} failed: {e}") from None
    if len(data) > max_bytes:
        raise BadMedia(f"{url} is larger than {max_bytes >> 20} MB")
    return data
