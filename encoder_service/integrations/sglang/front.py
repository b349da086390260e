"""The pool as an SGLang encoder server (EPD: `sglang serve --language-only --encoder-urls http://THIS:PORT`),
for sglang 0.5.23's default transfer backend (`zmq_to_scheduler`, HTTP mode).

    encoder-service sglang-encoder --pool POOL_HOST:9000 [--application encoder] --port 30001 \
        [--register http://LANGUAGE_HOST:8997]

What SGLang's language server does, and what this answers (sglang/srt/disaggregation/encoder/):
- its tokenizer POSTs `/encode` for each part of a request's media: `req_id` "<rid>_local_part_<k>", `mm_items`
  (URLs, data: URLs, or dicts with `url` and `content_hash` "sha256:<hex>"), `modality` IMAGE | VIDEO,
  `num_parts`, `part_idx`. The part's media go to the pool as ONE Encode (its cache by content, affinity,
  the one retry policy) under this front's tenant; `content_hash` must equal the digest of the bytes fetched
  (else 400);
- each of its scheduler's TP ranks POSTs `/scheduler_receive_url` (`req_id`, `receive_count` = TP size,
  `receive_url` host:port), before or after `/encode`;
- the part's rows go to every registered rank over ZMQ (PUSH to its PULL socket), in SGLang's framing
  (`frames`); `/encode` answers 200 once all `receive_count` ranks have them (SGLang's own encoder does the
  same), or an error (JSON `message`, and an error frame to every rank, which fails the request there);
- `GET /health` / `/health_generate`: 200 while the pool answers (SGLang's bootstrap probes every 10 s, 2 s
  timeout); with `--register`, this front registers itself with the language servers' bootstrap
  (`/register_encoder_url`), and again every 30 s (it evicts encoders whose health fails).

Per item, `grid_dim` is [frames, 1, rows per frame] for a video without EVS, else [1, 1, rows]: the rows are
what the pool's model produces (`integrations.sglang.plugin` lays InternVL prompts out from them).
Trust: see the README (ZMQ ports are SGLang's; the frames name only SGLang's allowlisted classes).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
from aiohttp import ClientSession, ClientTimeout, web

from encoder_service.client.pool import PoolClientConfig, PoolEncoderClient
from encoder_service.client.retry import RetryPolicy
from encoder_service.client.security import ClientSecurity
from encoder_service.contract.media import MediaInput, Modality, media_digest
from encoder_service.contract.result import EncodeResult
from encoder_service.integrations.media_urls import BadMedia, check_media_host, decode_data_url, download
from encoder_service.integrations.sglang.frames import MODALITIES, embedding_frames, error_frames

log = logging.getLogger(__name__)

SGLANG_VERSIONS = ("0.5.23",)  # the protocol version(s) this front speaks, as tested (tests/test_sglang.py)


@dataclass
class SGLangFrontConfig:
    pool: list[str] = field(default_factory=list)  # the pool's gRPC address(es)
    application: str = ""  # Serve application, when the pool is a Serve proxy
    token_file: str = ""  # the pool's token ("": $ENCODER_SERVICE_TOKEN_FILE / $ENCODER_SERVICE_TOKEN)
    tenant: str = "sglang"  # the pool tenant (cache namespace) of this SGLang deployment's media
    host: str = "127.0.0.1"
    port: int = 30001
    advertise: str = ""  # the URL SGLang reaches this at ("": http://host:port)
    register: list[str] = field(default_factory=list)  # language servers' bootstrap URLs (http://host:8997)
    max_media_bytes: int = 64 << 20
    fetch_timeout_s: float = 30.0  # an http(s) media URL
    encode_timeout_s: float = 120.0  # the pool's answer for one part
    send_timeout_s: float = 180.0  # waiting for the ranks' registrations (SGLANG_ENCODER_SEND_TIMEOUT)
    allow_local_files: bool = False  # media named by a path on this host (off: a user could read its files)
    allowed_media_domains: list[str] = field(default_factory=list)  # http(s) media only from these ([]: any)
    allow_private_media_hosts: bool = False  # http(s) media from private/loopback addresses (off: see media_urls)

    @property
    def url(self) -> str:
        return self.advertise or f"http://{self.host}:{self.port}"


class FrontError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Part:
    """One part of a request: where its rows go, and what to send them."""

    req_id: str
    receive_count: int | None = None
    urls: list[str] = field(default_factory=list)
    sent: set[str] = field(default_factory=set)
    frames: list | None = None
    started: float = field(default_factory=time.monotonic)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class SGLangEncoderFront:
    def __init__(self, cfg: SGLangFrontConfig):
        self.cfg = cfg
        policy = RetryPolicy(attempt_timeout_s=cfg.encode_timeout_s, total_timeout_s=cfg.encode_timeout_s,
                             max_attempts=3)
        self.pool = PoolEncoderClient(PoolClientConfig(cfg.pool, cfg.application, retry=policy),
                                      security=ClientSecurity.from_env(cfg.token_file or None))
        self.zmq = zmq.asyncio.Context()
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self.parts: dict[str, Part] = {}
        self.healthy = False
        self.http: ClientSession | None = None
        self._tasks: list[asyncio.Task] = []
        self.encoded = self.failed = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 << 20)
        app.router.add_post("/encode", self.encode)
        app.router.add_post("/scheduler_receive_url", self.receive_url)
        app.router.add_get("/health", self.health)
        app.router.add_get("/health_generate", self.health)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app) -> None:
        self.http = ClientSession(timeout=ClientTimeout(total=None))
        self._tasks = [asyncio.create_task(self._watch_pool()), asyncio.create_task(self._expire())]
        if self.cfg.register:
            self._tasks.append(asyncio.create_task(self._register()))

    async def _stop(self, app) -> None:
        for task in self._tasks:
            task.cancel()
        await self.http.close()
        for socket in self._sockets.values():
            socket.close(linger=0)
        self.zmq.term()
        self.pool.close()

    # ------------------------------------------------------------------ endpoints

    async def encode(self, request: web.Request) -> web.Response:
        body = None
        try:
            body = await request.json()
            req_id, modality, items, num_parts, part_idx = _check_encode(body)
        except (ValueError, FrontError) as e:
            status = e.status if isinstance(e, FrontError) else 400
            return _error(status, f"bad /encode request: {e}", body.get("req_id") if isinstance(body, dict) else None)
        part = self.parts.setdefault(req_id, Part(req_id))
        try:
            media = [await self._media(item, modality) for item in items]
            result = await asyncio.to_thread(self.pool.encode, media, self.cfg.tenant)
            part.frames = frames = embedding_frames(req_id, num_parts, part_idx, modality.name, _grids(result),
                                                    result.embeddings)
        except FrontError as e:
            return await self._fail(part, num_parts, part_idx, modality, e.status, str(e))
        except Exception as e:  # noqa: BLE001 - the pool's failure: the request fails, this front serves on
            message = f"{e.code().name}: {e.details()}" if hasattr(e, "code") and callable(e.code) else repr(e)
            return await self._fail(part, num_parts, part_idx, modality, 502, f"the encoder pool failed: {message}")
        try:
            await self._deliver(part, frames)
        except FrontError as e:
            return _error(e.status, str(e), req_id)
        finally:
            self.parts.pop(req_id, None)
        self.encoded += 1
        return web.json_response(None)

    async def receive_url(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            req_id, count, url = body["req_id"], body["receive_count"], body["receive_url"]
            if not isinstance(req_id, str) or not isinstance(count, int) or count < 1 or not isinstance(url, str):
                raise ValueError("req_id (str), receive_count (int >= 1) and receive_url (host:port) are required")
        except (ValueError, KeyError, TypeError) as e:
            return _error(400, f"bad /scheduler_receive_url request: {e}", None)
        part = self.parts.setdefault(req_id, Part(req_id))
        async with part.changed:
            if part.receive_count is not None and part.receive_count != count:
                return _error(400, f"inconsistent receive_count for {req_id}: {part.receive_count} then {count}",
                              req_id)
            part.receive_count = count
            if url not in part.urls:
                part.urls.append(url)
            part.changed.notify_all()
        return web.json_response(None)

    async def health(self, request: web.Request) -> web.Response:
        if self.healthy:
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "error", "message": "the encoder pool does not answer"}, status=503)

    # ------------------------------------------------------------------ the work

    async def _media(self, item, modality: Modality) -> MediaInput:
        """An `mm_items` entry's bytes (fetched once), checked against its `content_hash`."""
        url, content_hash = (item, None) if isinstance(item, str) else (item.get("url"), item.get("content_hash"))
        if not isinstance(url, str) or not url:
            raise FrontError(400, "an mm_items entry has no url")
        try:
            if url.startswith("data:"):
                data = decode_data_url(url)
            elif url.startswith(("http://", "https://")):
                await check_media_host(url, self.cfg.allowed_media_domains, self.cfg.allow_private_media_hosts)
                data = await download(self.http, url, self.cfg.max_media_bytes, self.cfg.fetch_timeout_s)
            elif self.cfg.allow_local_files:
                data = await asyncio.to_thread(_read_file, url, self.cfg.max_media_bytes)
            else:
                raise BadMedia("media must be an http(s) or data: URL (local paths are not read here)")
        except BadMedia as e:
            raise FrontError(400, str(e)) from None
        if len(data) > self.cfg.max_media_bytes:
            raise FrontError(400, f"a media item is larger than {self.cfg.max_media_bytes >> 20} MB")
        if content_hash and content_hash != media_digest(data):
            raise FrontError(400, f"content_hash {content_hash[:23]}… is not the digest of the media fetched")
        return MediaInput(modality, data)

    async def _deliver(self, part: Part, frames: list) -> None:
        """The part's frames to every rank as it registers, until `receive_count` have them."""
        deadline = part.started + self.cfg.send_timeout_s
        while True:
            async with part.changed:
                pending = [url for url in part.urls if url not in part.sent]
                done = part.receive_count is not None and len(part.sent) >= part.receive_count
                if not pending and not done:
                    try:
                        await asyncio.wait_for(part.changed.wait(), timeout=max(0.0, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        raise FrontError(504, f"{part.req_id}: {len(part.sent)} of "
                                         f"{part.receive_count or '?'} ranks registered in time") from None
                    continue
            if done:
                return
            for url in pending:
                await self._push(url, frames, deadline)
                part.sent.add(url)

    async def _push(self, url: str, frames: list, deadline: float) -> None:
        socket = self._sockets.get(url)
        if socket is None:
            socket = self.zmq.socket(zmq.PUSH)
            socket.setsockopt(zmq.LINGER, 5000)
            socket.connect(f"tcp://{url}")
            self._sockets[url] = socket
        try:
            await asyncio.wait_for(socket.send_multipart(frames, copy=False),
                                   timeout=max(0.1, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise FrontError(504, f"sending to rank {url} timed out") from None

    async def _fail(self, part: Part, num_parts: int, part_idx: int, modality: Modality, status: int,
                    message: str) -> web.Response:
        """Tell the ranks registered (and those registering within the send timeout, in the background), answer
        the error."""
        self.failed += 1
        log.warning("%s: %s", part.req_id, message)
        frames = error_frames(part.req_id, num_parts, part_idx, modality.name, message, status)
        task = asyncio.create_task(self._deliver_and_forget(part, frames))
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)
        return _error(status, message, part.req_id)

    async def _deliver_and_forget(self, part: Part, frames: list) -> None:
        try:
            await self._deliver(part, frames)
        except FrontError:
            pass
        finally:
            self.parts.pop(part.req_id, None)

    async def _watch_pool(self) -> None:
        """One probe at a time: a probe that outlives its 5 s is left to finish (the pool is reported down
        meanwhile) rather than joined by a new thread every period."""
        probe = None
        while True:
            if probe is None or probe.done():
                probe = asyncio.ensure_future(asyncio.to_thread(self.pool.model_info))
            try:
                await asyncio.wait_for(asyncio.shield(probe), timeout=5)
                self.healthy = True
            except Exception:  # noqa: BLE001 - any failure or a slow answer: the pool is down for /health
                self.healthy = False
            await asyncio.sleep(2.0)

    async def _expire(self) -> None:
        """Registrations whose /encode never came (the request was aborted first) are dropped."""
        while True:
            await asyncio.sleep(5.0)
            now = time.monotonic()
            for req_id, part in list(self.parts.items()):
                if part.frames is None and now - part.started > self.cfg.send_timeout_s + 10:
                    self.parts.pop(req_id, None)

    async def _register(self) -> None:
        while True:
            for bootstrap in self.cfg.register:
                try:
                    async with self.http.post(f"{bootstrap.rstrip('/')}/register_encoder_url",
                                              json={"url": self.cfg.url}, timeout=ClientTimeout(total=5)) as r:
                        if r.status != 200:
                            log.warning("registering with %s answered HTTP %d", bootstrap, r.status)
                except (OSError, asyncio.TimeoutError) as e:
                    log.warning("registering with %s failed: %s", bootstrap, e)
            await asyncio.sleep(30.0)


def _check_encode(body) -> tuple[str, Modality, list, int, int]:
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    req_id, modality, items = body.get("req_id"), body.get("modality"), body.get("mm_items")
    num_parts, part_idx = body.get("num_parts"), body.get("part_idx")
    if not isinstance(req_id, str) or not req_id:
        raise ValueError("req_id must be a non-empty string")
    if not isinstance(modality, str) or modality not in MODALITIES or modality == "AUDIO":
        raise FrontError(400, f"modality {modality!r} is not served here (IMAGE, VIDEO)")
    if not isinstance(items, list) or not items:
        raise ValueError("mm_items must be a non-empty list")
    if type(num_parts) is not int or type(part_idx) is not int or not 0 <= part_idx < num_parts:
        raise ValueError("num_parts and part_idx must be integers with 0 <= part_idx < num_parts")
    return req_id, Modality(modality.lower()), items, num_parts, part_idx


def _grids(result: EncodeResult) -> list[list[int]]:
    """Per item: [frames, 1, rows per frame] for a video whose frames kept equal rows, else [1, 1, rows]."""
    out = []
    for item in result.items:
        frames = item.tokens_per_frame
        if frames and len(set(frames)) == 1:
            out.append([len(frames), 1, frames[0]])
        else:
            out.append([1, 1, item.token_count])
    return out


def _read_file(path: str, max_bytes: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)


def _error(status: int, message: str, req_id: str | None) -> web.Response:
    return web.json_response({"status": "error", "message": message, "req_id": req_id}, status=status)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="encoder-service sglang-encoder", description=__doc__.splitlines()[0])
    p.add_argument("--pool", required=True, action="append", help="the encoder pool's gRPC address (repeatable)")
    p.add_argument("--application", default="", help="Serve application name, when --pool is a Serve proxy")
    p.add_argument("--tenant", default="sglang", help="the pool tenant (cache namespace) of these media")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30001)
    p.add_argument("--advertise", default="", help="the URL SGLang reaches this at (default http://HOST:PORT)")
    p.add_argument("--register", action="append", default=[],
                   help="a language server's encoder bootstrap URL (http://HOST:8997) to register with (repeatable)")
    p.add_argument("--allow-local-files", action="store_true", help="read media given as paths on this host")
    p.add_argument("--allowed-media-domain", action="append", default=[],
                   help="fetch http(s) media only from this domain and its subdomains (repeatable; default any)")
    p.add_argument("--allow-private-media-hosts", action="store_true",
                   help="fetch http(s) media from private, loopback and link-local addresses too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = SGLangFrontConfig(args.pool, args.application, tenant=args.tenant, host=args.host, port=args.port,
                            advertise=args.advertise, register=args.register,
                            allow_local_files=args.allow_local_files, allowed_media_domains=args.allowed_media_domain,
                            allow_private_media_hosts=args.allow_private_media_hosts)
    web.run_app(SGLangEncoderFront(cfg).app(), host=cfg.host, port=cfg.port, print=lambda *_: print(
        f"SGLang encoder front on {cfg.url} (sglang {', '.join(SGLANG_VERSIONS)}) -> encoder pool "
        f"{', '.join(cfg.pool)}", flush=True))


if __name__ == "__main__":
    main()
