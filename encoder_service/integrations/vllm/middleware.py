"""The front end's work inside vLLM's own OpenAI server, as ASGI middleware: no extra HTTP hop.

    ENCODER_POOL_FRONTEND=/etc/encoder-pool/frontend.json vllm serve MODEL \
        --middleware encoder_service.integrations.vllm.middleware.EncoderPoolMiddleware \
        --ec-transfer-config '{"ec_connector": "EncoderPoolConnector", ...}'

$ENCODER_POOL_FRONTEND names a JSON file of `chat.ChatBinderConfig` fields (at least "pool"). Chat completions
are rewritten as `chat` describes before vLLM's handler parses them; everything else passes untouched. vLLM
adds this middleware outside its own API-key check: when $VLLM_API_KEY is set, a request without that key is
passed on untouched (vLLM refuses it), so no unauthenticated request makes the pool work.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from pathlib import Path

from aiohttp import ClientSession, ClientTimeout

from encoder_service.integrations.media_urls import BadMedia, download
from encoder_service.integrations.vllm.chat import ChatBinder, ChatBinderConfig, dumps, loads
from encoder_service.integrations.vllm.frontend import bearer

log = logging.getLogger(__name__)

CONFIG_ENV = "ENCODER_POOL_FRONTEND"
CHAT_PATH = "/v1/chat/completions"


class EncoderPoolMiddleware:
    def __init__(self, app):
        self.app = app
        path = os.environ.get(CONFIG_ENV)
        if not path:
            raise ValueError(f"${CONFIG_ENV} must name the front end's JSON config (ChatBinderConfig fields)")
        self.binder = ChatBinder(ChatBinderConfig.from_mapping(json.loads(Path(path).read_text())), self._download)
        self.api_key = os.environ.get("VLLM_API_KEY") or None
        self._http: ClientSession | None = None

    async def _download(self, url: str, max_bytes: int, timeout_s: float) -> bytes:
        if self._http is None:
            self._http = ClientSession(timeout=ClientTimeout(total=None))
        return await download(self._http, url, max_bytes, timeout_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != CHAT_PATH:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = bearer(headers.get("authorization"))
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if self.api_key is None or (key is not None and hmac.compare_digest(key, self.api_key)):
            try:
                parsed = loads(body)
            except ValueError:  # not a JSON object: vLLM answers it (it carries nothing this would bind)
                parsed = None
            if parsed is not None:
                try:
                    body = dumps(await self.binder.rewrite(parsed, key))
                except BadMedia as e:
                    return await _answer_400(send, str(e))
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
                 + [(b"content-length", str(len(body)).encode())]}
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # the client's disconnect, if it comes
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def _answer_400(send, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "code": 400}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
