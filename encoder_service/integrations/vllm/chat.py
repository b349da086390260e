"""A chat-completion request on its way to vLLM: its media put into the pool and bound to the request, with
nothing a user sends trusted. Used by both ways in: the front end (`frontend.py`, a separate HTTP hop) and
the ASGI middleware inside vLLM's own API server (`middleware.py`, no extra hop).

For each request (`ChatBinder.rewrite`):
1. every media part the OpenAI API allows is found (`image_url` / `input_image` / `video_url` parts, typed or
   untyped), and every part's user-supplied `uuid` is dropped, as are `ec_transfer_params` (top level and in
   `vllm_xargs`): only bindings this code makes reach vLLM;
2. each URL is fetched once (data: URLs decoded; http(s) URLs downloaded, bounded) and the part rewritten to a
   data: URL of exactly those bytes, so vLLM's processor and the pool see the same media (a URL could answer
   differently twice);
3. the digest of those bytes, the user's tenant (from the bearer token the user sent: `binding.tenant_of`)
   and the item's options are bound into the part's `uuid` (`binding.Binder`); `ec_transfer_params`
   announces how many items were bound (the connector warns when vLLM re-hashed some);
4. the items go to the pool as a cache-only upload (no rows back) *concurrently* with forwarding the
   request: vLLM's connector fetches them by digest when the scheduler reaches the request, and falls back
   to vLLM's own encoder if the upload failed. Items uploaded recently (a conversation re-sending its
   images) go by digest first and with their media only where the pool lacks them; others with their
   media at once (no probe round trip).
A request carrying `mm_processor_kwargs` or `media_io_kwargs` makes vLLM re-hash its items: it is forwarded
without bindings (counted as a bypass, with a warning): vLLM encodes it itself.

Metrics (prometheus_client's default registry: vLLM's own /metrics shows them when this runs inside it):
`encoder_pool_frontend_seconds` (the rewrite, on the request's path), `encoder_pool_frontend_items_total{outcome}`
(bound, bypassed), `encoder_pool_frontend_uploads_total{outcome}` (ok, failed), `encoder_pool_frontend_upload_seconds`
(beside the request's path).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Awaitable, Callable

import grpc
import orjson
import pybase64  # SIMD base64: a data URL is decoded here before vLLM sees the request

from encoder_service.client.pool import PoolClientConfig, PoolEncoderClient
from encoder_service.client.retry import RetryPolicy
from encoder_service.client.security import ClientSecurity
from encoder_service.contract.media import MediaInput, Modality, VideoSampling, media_digest
from encoder_service.contract.settings import from_mapping
from encoder_service.integrations.media_urls import BadMedia, check_media_host, decode_data_url
from encoder_service.integrations.vllm.binding import Binder, Bound, tenant_of

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

MEDIA_KINDS = {"image_url": Modality.IMAGE, "input_image": Modality.IMAGE, "video_url": Modality.VIDEO}
BYPASS_KEYS = ("mm_processor_kwargs", "media_io_kwargs")


@dataclass
class ChatBinderConfig:
    pool: list[str] = field(default_factory=list)  # the pool's gRPC address(es)
    application: str = ""  # Serve application name when the pool is a Ray Serve proxy
    binding_key_file: str = ""  # the secret shared with vLLM's connector ("": $ENCODER_POOL_BINDING_KEY_FILE)
    token_file: str = ""  # the pool's bearer token ("": $ENCODER_SERVICE_TOKEN_FILE / $ENCODER_SERVICE_TOKEN)
    tenants: str = "api_key"  # "api_key": users told apart by the bearer token they send; "shared": one tenant
    max_media_bytes: int = 64 << 20  # per media item
    fetch_timeout_s: float = 30.0  # downloading an http(s) media URL
    upload_timeout_s: float = 30.0
    # Frames vLLM samples from a video (its VideoMediaIO's `num_frames`, 32 unless the server was started with
    # --media-io-kwargs): the pool samples the same, so its rows and vLLM's placeholders agree.
    video_frames: int = 32
    # http(s) media URLs: hosts they may name ([]: any public one); private, loopback and link-local
    # addresses are refused unless allowed (a user must not make the front end fetch from its own network).
    allowed_media_domains: list[str] = field(default_factory=list)
    allow_private_media_hosts: bool = False
    max_uploads: int = 64  # uploads to the pool in flight; beyond, a request's items go to vLLM's encoder
    recent_items: int = 65536  # items remembered as uploaded (sent by digest first when they come again)
    recent_s: float = 600.0  # ... for this long

    def __post_init__(self):
        if isinstance(self.pool, str):
            self.pool = [self.pool]
        if self.tenants not in ("api_key", "shared"):
            raise ValueError(f"tenants must be api_key or shared, not {self.tenants!r}")

    @classmethod
    def from_mapping(cls, values: dict) -> "ChatBinderConfig":
        return from_mapping(cls, values, "the encoder pool front end's config")


def loads(body: bytes) -> dict:
    """A request body parsed (orjson: the body carries megabytes of base64 media; ValueError if not JSON)."""
    parsed = orjson.loads(body)
    if not isinstance(parsed, dict):
        raise ValueError("a chat request must be a JSON object")
    return parsed


def dumps(body: dict) -> bytes:
    return orjson.dumps(body)


@dataclass
class MediaPart:
    part: dict  # the message content part, rewritten in place
    modality: Modality
    url: str


def media_parts(body: dict) -> list[MediaPart]:
    """Every media part of a chat request's messages (typed, or untyped with an image_url / video_url key),
    each with its user-supplied `uuid` dropped; every other part loses its `uuid` too."""
    found = []
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            part.pop("uuid", None)
            kind = part.get("type")
            key = kind if kind in MEDIA_KINDS else next((k for k in ("image_url", "video_url") if k in part), None)
            if key is None or (kind is not None and kind not in MEDIA_KINDS):
                continue
            ref = part.get("image_url" if key == "input_image" else key)
            url = ref.get("url") if isinstance(ref, dict) else ref
            if isinstance(url, str):
                found.append(MediaPart(part, MEDIA_KINDS[key], url))
    return found


def _set_url(media: MediaPart, url: str) -> None:
    key = "video_url" if media.modality == Modality.VIDEO else "image_url"
    if isinstance(media.part.get(key), dict):
        media.part[key]["url"] = url
    else:
        media.part[key] = url


def _mime(modality: Modality, data: bytes) -> str:
    if modality == Modality.VIDEO:
        return "video/mp4"
    for magic, mime in ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"RIFF", "image/webp")):
        if data.startswith(magic):
            return mime
    return "application/octet-stream"


class ChatBinder:
    def __init__(self, cfg: ChatBinderConfig, download: Callable[[str, int, float], Awaitable[bytes]] | None = None):
        """`download(url, max_bytes, timeout_s)`: an http(s) URL's bytes (None: http(s) URLs are refused)."""
        self.cfg = cfg
        self.binder = Binder.from_file(cfg.binding_key_file or None)
        security = ClientSecurity.from_env(cfg.token_file or None)
        policy = RetryPolicy(attempt_timeout_s=cfg.upload_timeout_s, total_timeout_s=cfg.upload_timeout_s,
                             max_attempts=3)
        self.pool = PoolEncoderClient(PoolClientConfig(cfg.pool, cfg.application, retry=policy), security=security)
        self.download = download
        self.metrics = _metrics()
        self._uploads: set[asyncio.Task] = set()
        self._upload_threads = ThreadPoolExecutor(8, thread_name_prefix="encoder-pool-upload")
        self._recent: OrderedDict[tuple[str, str], float] = OrderedDict()  # (tenant, digest) -> uploaded at

    async def rewrite(self, body: dict, api_key: str | None) -> dict:
        """`body` (a parsed chat-completion request) rewritten in place as the module docstring says, its
        upload started; raises BadMedia for media that cannot be read."""
        with self.metrics["seconds"].time():
            return await self._rewrite(body, api_key)

    async def _rewrite(self, body: dict, api_key: str | None) -> dict:
        body.pop("ec_transfer_params", None)
        if isinstance(body.get("vllm_xargs"), dict):
            body["vllm_xargs"].pop("ec_transfer_params", None)
        parts = media_parts(body)
        if not parts:
            return body
        if any(key in body for key in BYPASS_KEYS):
            self.metrics["items"].labels("bypassed").inc(len(parts))
            log.warning("a request with %s: its %d media item(s) go to vLLM's own encoder (vLLM re-hashes them)",
                        "/".join(k for k in BYPASS_KEYS if k in body), len(parts))
            return body
        tenant = tenant_of(api_key) if self.cfg.tenants == "api_key" else "shared"
        fetched: dict[str, tuple[bytes, str]] = {}  # url -> its bytes, their digest
        items: dict[str, MediaInput] = {}  # by digest: an item twice in a request is uploaded once
        for media in parts:
            if media.url not in fetched:
                data = await self._bytes(media.url)
                fetched[media.url] = data, media_digest(data)
            data, digest = fetched[media.url]
            if not media.url.startswith("data:"):
                _set_url(media, f"data:{_mime(media.modality, data)};base64,{pybase64.b64encode(data).decode()}")
            bound = Bound(tenant, media.modality, digest, *self._video_options(media.modality))
            media.part["uuid"] = self.binder.bind(bound)
            items.setdefault(digest, MediaInput(media.modality, data, sampling=bound.sampling,
                                                pruning_rate=bound.pruning_rate))
        body["ec_transfer_params"] = {"encoder_pool": {"items": len(parts)}}
        self.metrics["items"].labels("bound").inc(len(parts))
        if len(self._uploads) >= self.cfg.max_uploads:  # the pool is slow or gone: vLLM's connector falls back
            self.metrics["uploads"].labels("failed").inc()
            log.warning("%d uploads to the encoder pool in flight: a request's %d item(s) go to vLLM's encoder",
                        len(self._uploads), len(items))
            return body
        task = asyncio.get_running_loop().create_task(self._upload(items, tenant))
        self._uploads.add(task)
        task.add_done_callback(self._uploads.discard)
        return body

    async def _upload(self, items: dict[str, MediaInput], tenant: str) -> None:
        probe = [self._uploaded_recently(tenant, digest) for digest in items]
        try:
            with self.metrics["upload_seconds"].time():
                await asyncio.get_running_loop().run_in_executor(
                    self._upload_threads, self.pool.upload, list(items.values()), tenant, probe, list(items))
            self.metrics["uploads"].labels("ok").inc()
            self._remember(tenant, items)
        except Exception as e:  # noqa: BLE001 - the connector falls back to vLLM's encoder for these
            self.metrics["uploads"].labels("failed").inc()
            why = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else repr(e)
            log.warning("the encoder pool did not take a request's %d item(s) (%s): vLLM encodes them itself",
                        len(items), why)

    def _video_options(self, modality: Modality) -> tuple[VideoSampling | None, float | None]:
        """What a video's rows depend on, as vLLM lays it out: its sampled frames, and no pruning (vLLM's
        InternVL keeps every patch)."""
        if modality != Modality.VIDEO:
            return None, None
        return VideoSampling(num_frames=self.cfg.video_frames), 0.0

    def _uploaded_recently(self, tenant: str, digest: str) -> bool:
        when = self._recent.get((tenant, digest))
        return when is not None and time.monotonic() - when < self.cfg.recent_s

    def _remember(self, tenant: str, digests) -> None:
        now = time.monotonic()
        for digest in digests:
            self._recent[(tenant, digest)] = now
            self._recent.move_to_end((tenant, digest))
        while len(self._recent) > self.cfg.recent_items:
            self._recent.popitem(last=False)

    async def _bytes(self, url: str) -> bytes:
        if url.startswith("data:"):
            data = decode_data_url(url)
        elif url.startswith(("http://", "https://")) and self.download is not None:
            await check_media_host(url, self.cfg.allowed_media_domains, self.cfg.allow_private_media_hosts)
            data = await self.download(url, self.cfg.max_media_bytes, self.cfg.fetch_timeout_s)
        else:
            raise BadMedia("a media URL must be a data: URL" + (" or an http(s) URL" if self.download else ""))
        if len(data) > self.cfg.max_media_bytes:
            raise BadMedia(f"a media item is larger than {self.cfg.max_media_bytes >> 20} MB")
        return data

    async def drain(self) -> None:
        """Wait for the uploads in flight (shutdown)."""
        if self._uploads:
            await asyncio.gather(*self._uploads, return_exceptions=True)

    def close(self) -> None:
        self._upload_threads.shutdown(wait=False)
        self.pool.close()


@lru_cache(maxsize=None)
def _metrics() -> dict:
    """The front end's metrics, registered once per process."""
    from prometheus_client import Counter, Histogram

    return {
        "seconds": Histogram("encoder_pool_frontend_seconds", "a chat request's rewrite (media fetched, bound)",
                             buckets=LATENCY_BUCKETS_S),
        "items": Counter("encoder_pool_frontend_items", "media items of chat requests", ["outcome"]),
        "uploads": Counter("encoder_pool_frontend_uploads", "cache-only uploads to the pool", ["outcome"]),
        "upload_seconds": Histogram("encoder_pool_frontend_upload_seconds", "a request's upload to the pool",
                                    buckets=LATENCY_BUCKETS_S),
    }
