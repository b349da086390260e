"""The consumer side of the pool, for anything that uses its rows (the LLM worker, other engines'
connectors, the CLI): `endpoint.EncoderClient` for one gRPC endpoint, `pool.PoolEncoderClient` for a pool
(affinity routing, either transport), `retry` (the one retry policy), `checks` (the checks a consumer runs
on every answer), `security` (TLS and tokens). It depends on `contract` only, never on the encoder.
"""
