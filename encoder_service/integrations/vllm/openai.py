"""OpenAI chat-completion requests, as a client of the front end (or of vLLM) sends them: messages with
images as data URLs, plain and streamed posts (standard library only; tests and benches)."""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path


def data_url(path: str | Path, mime: str = "image/png") -> str:
    """A media file as a data URL."""
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def chat_messages(images: list[str | Path], text: str = " Describe.", videos: list[str | Path] = ()) -> list[dict]:
    """One user turn: "Look: ", the images then the videos (files, as data URLs), then `text`."""
    content = [{"type": "text", "text": "Look: "}]
    for path in images:
        content.append({"type": "image_url", "image_url": {"url": data_url(path)}})
    for path in videos:
        content.append({"type": "video_url", "video_url": {"url": data_url(path, "video/mp4")}})
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


def post_json(url: str, body: dict, timeout_s: float = 300.0, headers: dict | None = None) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json",
                                                                      **(headers or {})})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def post_stream(url: str, body: dict, timeout_s: float = 300.0, on_first=None, headers: dict | None = None) -> str:
    """A streamed completion's text, from its server-sent events. `on_first()` when the first chunk arrives:
    vLLM sends it (the role) with the first generated token's output, before any text (a random tiny model's
    first tokens are often incomplete UTF-8, which vLLM holds back)."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json",
                                                                      **(headers or {})})
    text: list[str] = []
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                if on_first is not None:
                    on_first()
                    on_first = None
                text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text)
