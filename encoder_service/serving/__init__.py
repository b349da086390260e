"""Serving the encoder, in two halves that speak the contract's wire (`contract.wire`: protobuf messages,
tensors as raw bytes, statuses):

- `host/`: what hosts the model — the model process and its pipeline (admission, preprocessing workers,
  shared-memory arenas, the device loop), typed messages between those processes;
- `api/`: what faces clients — the edge every call passes (tenant, admission, statuses, metrics), the
  standalone gRPC server, the Ray Serve pool (`api/serve`), security and metrics.
Imports go one way: `api` uses `host`, never the reverse.
"""
