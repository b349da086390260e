"""The pool as SGLang's encoder server (SGLang's EPD: `--language-only --encoder-urls`): `front` (HTTP in, ZMQ
out, sglang 0.5.23's protocol) and `frames` (SGLang's message framing, written without importing sglang)."""
