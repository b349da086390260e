"""An OpenAI-compatible front end that puts the encoder pool in front of vLLM.

    python -m encoder_service.integrations.vllm.frontend --pool POOL_HOST:PORT --vllm http://VLLM:8000 [--port 8080]

A chat completion's images (`image_url` parts: data URLs, or http(s) URLs the front end downloads) go
to the pool first (probe, then upload: a repeated image costs its digest); the request is forwarded to
vLLM with each image part tagged with the pool's digest (`"uuid"`, vLLM's multi_modal_uuids), so vLLM's
connector (`connector.EncoderPoolConnector`) fetches those very rows and vLLM's own vision encoder
never runs. Everything else is passed through as it is, streamed responses too. vLLM still receives
the image itself: its processor lays out the placeholders from it.

A pool that cannot take an image answers for it: 400 with its message for a bad image, 503 when the
pool is unavailable (the client retries), never a request that vLLM would have to fail later.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import logging
from dataclasses import dataclass

import grpc
from aiohttp import ClientSession, ClientTimeout, web

from encoder_service.client.endpoint import EncoderClient
from encoder_service.contract.media import MediaInput, Modality

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 64 << 20


@dataclass
class FrontendConfig:
    pool: str  # the encoder pool's gRPC address
    vllm: str  # vLLM's OpenAI server, e.g. http://127.0.0.1:8000
    application: str = ""  # Serve application name when the pool is a Ray Serve proxy
    host: str = "127.0.0.1"
    port: int = 8080
    pool_timeout_s: float = 60.0


class BadImage(ValueError):
    """An image the request carries that cannot be used (bad URL or data, or the pool refused it)."""


class Frontend:
    def __init__(self, cfg: FrontendConfig):
        self.cfg = cfg
        self.pool = EncoderClient(cfg.pool, timeout=cfg.pool_timeout_s, probe=True)
        self.metadata = (("application", cfg.application),) if cfg.application else None
        self.http: ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 * MAX_IMAGE_BYTES)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_route("*", "/{tail:.*}", self.pass_through)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, app) -> None:
        self.http = ClientSession(timeout=ClientTimeout(total=None))

    async def _close(self, app) -> None:
        await self.http.close()
        self.pool.close()

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        parts = [part for message in body.get("messages", []) if isinstance(message.get("content"), list)
                 for part in message["content"] if isinstance(part, dict) and part.get("type") == "image_url"]
        if parts:
            try:
                images = [await self._image_bytes(part) for part in parts]
                digests = await asyncio.to_thread(self._encode, images)
            except BadImage as e:
                return _error(400, str(e))
            except grpc.RpcError as e:
                status = 503 if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) else 400
                return _error(status, f"the encoder pool refused the images: {e.code().name}: {e.details()}")
            for part, digest in zip(parts, digests):
                part["uuid"] = digest
        return await self._forward(request, body)

    def _encode(self, images: list[bytes]) -> list[str]:
        """The images into the pool (cached there for the connector to fetch); their digests."""
        result = self.pool.encode([MediaInput(Modality.IMAGE, data) for data in images], metadata=self.metadata,
                                  copy=False)
        return [item.digest for item in result.items]

    async def _image_bytes(self, part: dict) -> bytes:
        url = (part.get("image_url") or {}).get("url", "")
        if url.startswith("data:"):
            try:
                header, payload = url.split(",", 1)
                if not header.endswith(";base64"):
                    raise BadImage("a data URL image must be base64")
                return base64.b64decode(payload, validate=True)
            except (ValueError, binascii.Error) as e:
                raise BadImage(f"undecodable data URL image: {e}") from None
        if url.startswith(("http://", "https://")):
            async with self.http.get(url) as response:
                if response.status != 200:
                    raise BadImage(f"fetching {url} answered HTTP {response.status}")
                data = await response.content.read(MAX_IMAGE_BYTES + 1)
                if len(data) > MAX_IMAGE_BYTES:
                    raise BadImage(f"{url} is larger than {MAX_IMAGE_BYTES >> 20} MB")
                return data
        raise BadImage("an image_url must be a data: URL or an http(s) URL")

    async def _forward(self, request: web.Request, body: dict | None) -> web.StreamResponse:
        """The request to vLLM, the answer back as it comes (server-sent events pass through chunk by chunk)."""
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type", "accept")}
        kwargs = {"json": body} if body is not None else {"data": await request.read()}
        async with self.http.request(request.method, self.cfg.vllm.rstrip("/") + request.rel_url.path_qs,
                                     headers=headers, **kwargs) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "cache-control")})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def pass_through(self, request: web.Request) -> web.StreamResponse:
        return await self._forward(request, None)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error" if status == 400
                                        else "service_unavailable", "code": status}}, status=status)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", required=True, help="the encoder pool's gRPC address (standalone server or Serve proxy)")
    p.add_argument("--application", default="", help="Serve application name, when --pool is a Serve proxy")
    p.add_argument("--vllm", required=True, help="vLLM's OpenAI server URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = FrontendConfig(pool=args.pool, vllm=args.vllm, application=args.application, host=args.host, port=args.port)
    web.run_app(Frontend(cfg).app(), host=cfg.host, port=cfg.port, print=lambda *_: print(
        f"front end on http://{cfg.host}:{cfg.port} -> vLLM {cfg.vllm}, encoder pool {cfg.pool}", flush=True))


if __name__ == "__main__":
    main()
