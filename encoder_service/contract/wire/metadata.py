"""The gRPC metadata (headers) the API reads, besides `authorization: Bearer <token>`."""

APPLICATION_KEY = "application"  # through a Serve proxy serving several applications: the one to reach
ROUTING_KEY = "session_id"  # the pool's affinity key (Serve's routing): an item's media digest
TENANT_KEY = "tenant"  # a sub-namespace inside the caller's verified identity (a front end's users)
