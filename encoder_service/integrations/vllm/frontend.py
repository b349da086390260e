"""An OpenAI-compatible front end that puts the encoder pool in front of vLLM, as a separate HTTP hop.

    python -m encoder_service.integrations.vllm.frontend --pool POOL_HOST:PORT --vllm http://VLLM:8000 \
        --binding-key-file /run/secrets/binding-key [--port 8080]

Chat completions are rewritten as `chat` describes (media fetched once, put into the pool under the user's
tenant, bound to the request so that no user can claim another's rows) and forwarded to vLLM; everything
else, streamed responses too, passes through as it is. The same work without the extra hop: the ASGI
middleware inside vLLM's own API server (`middleware.py`), which bench/vllm_epd.py measures against this.
A request with media that cannot be read is answered 400; the pool being down costs nothing here (the
upload runs beside the request; vLLM's connector falls back to vLLM's own encoder).
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
from dataclasses import dataclass

from aiohttp import ClientSession, ClientTimeout, web

from encoder_service.integrations.media_urls import BadMedia, download
from encoder_service.integrations.vllm.chat import ChatBinder, ChatBinderConfig, dumps, loads

log = logging.getLogger(__name__)


@dataclass
class FrontendConfig:
    vllm: str  # vLLM's OpenAI server, e.g. http://127.0.0.1:8000
    binding: ChatBinderConfig
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str = ""  # vLLM's API key ("": $VLLM_API_KEY): requests without it reach vLLM untouched (it refuses)

    def __post_init__(self):
        self.api_key = self.api_key or os.environ.get("VLLM_API_KEY", "")


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    return None


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error" if status == 400
                                        else "service_unavailable", "code": status}}, status=status)


class Frontend:
    def __init__(self, cfg: FrontendConfig):
        self.cfg = cfg
        self.http: ClientSession | None = None
        self.binder = ChatBinder(cfg.binding, lambda url, limit, timeout: download(self.http, url, limit, timeout))

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 * self.cfg.binding.max_media_bytes)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/frontend/metrics", self.metrics)
        app.router.add_route("*", "/{tail:.*}", self.pass_through)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, app) -> None:
        self.http = ClientSession(timeout=ClientTimeout(total=None))

    async def _close(self, app) -> None:
        await self.binder.drain()
        await self.http.close()
        self.binder.close()

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        key = bearer(request.headers.get("Authorization"))
        if self.cfg.api_key and not (key and hmac.compare_digest(key, self.cfg.api_key)):
            return await self._forward(request, None)  # vLLM refuses it: no work for the pool before that
        try:
            body = await self.binder.rewrite(loads(await request.read()), key)
        except BadMedia as e:
            return error(400, str(e))
        except ValueError as e:  # not JSON
            return error(400, f"the request body is not JSON: {e}")
        return await self._forward(request, body)

    async def _forward(self, request: web.Request, body: dict | None) -> web.StreamResponse:
        """The request to vLLM, the answer back as it comes (server-sent events pass through chunk by chunk)."""
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type", "accept")}
        if body is not None:
            headers["Content-Type"] = "application/json"
        data = dumps(body) if body is not None else await request.read()
        async with self.http.request(request.method, self.cfg.vllm.rstrip("/") + request.rel_url.path_qs,
                                     headers=headers, data=data) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "cache-control")})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def pass_through(self, request: web.Request) -> web.StreamResponse:
        return await self._forward(request, None)

    async def metrics(self, request: web.Request) -> web.Response:
        """This front end's own metrics (vLLM's are at /metrics, passed through)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", required=True, action="append", help="the encoder pool's gRPC address (repeatable)")
    p.add_argument("--application", default="", help="Serve application name, when --pool is a Serve proxy")
    p.add_argument("--vllm", required=True, help="vLLM's OpenAI server URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--binding-key-file", default="", help="the secret shared with vLLM's connector "
                   "(default: $ENCODER_POOL_BINDING_KEY_FILE)")
    p.add_argument("--tenants", default="api_key", choices=["api_key", "shared"],
                   help="api_key: each user's media in a tenant of its own (by the bearer token it sends)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = FrontendConfig(args.vllm, ChatBinderConfig(args.pool, args.application, args.binding_key_file,
                                                     tenants=args.tenants), args.host, args.port)
    web.run_app(Frontend(cfg).app(), host=cfg.host, port=cfg.port, print=lambda *_: print(
        f"front end on http://{cfg.host}:{cfg.port} -> vLLM {cfg.vllm}, encoder pool {', '.join(args.pool)}",
        flush=True))


if __name__ == "__main__":
    main()
