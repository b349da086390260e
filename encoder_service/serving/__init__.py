"""Serving the encoder, in two halves that speak one protocol (`wire`: protobuf messages,
tensors as raw bytes, statuses):

- `host/`: what hosts the model — the model process and its pipeline (preprocessing workers,
  shared-memory arenas, batching onto the device), framed messages between those processes;
- `api/`: what faces clients — the gRPC server and client, security, metrics, and the Ray
  Serve pool.
Imports go one way: `api` uses `host`, never the reverse; both use `wire`.
"""
