"""vLLM consumes the pool's embeddings (encode / prefill / decode disaggregation):

- `connector.EncoderPoolConnector`: vLLM's ECConnector (consumer role) that fetches an item's rows
  from the pool by its media digest, checks them and hands them to vLLM's encoder cache;
- `frontend`: an OpenAI-compatible proxy that sends a chat's images to the pool first and forwards
  the request to vLLM with the pool's digests as `multi_modal_uuids`, so both sides share one key;
- `tiny_model`: a tiny random checkpoint both sides serve (tests, benches).
Installed into vLLM's environment with `pip install 'encoder-service[vllm]'`.
"""
