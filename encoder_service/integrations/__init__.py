"""Integrations with other serving engines. Nothing in the core (encoder_service.*, llm_worker.*)
imports them; each is installed with its extra (e.g. `encoder-service[vllm]`)."""
