"""What faces clients: the edge every door shares, the standalone gRPC server, the Ray Serve pool (`serve`),
security, metrics, streaming on the serving side."""
