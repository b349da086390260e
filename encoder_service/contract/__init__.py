"""The contract between the encoder pool and its consumers: what a request and an answer are, the
token-count rules a consumer lays placeholders out with, the model description (`ModelInfo`), and
the wire codecs (`contract.wire`).

The import rule: this package imports no model code. Nothing here loads `engine`, `models`,
`attention`, `preprocess` or `serving` (tests/test_architecture.py checks `sys.modules`), so a
client, an LLM worker or another engine's connector stays light. Everything else depends on it,
never the reverse.
"""
