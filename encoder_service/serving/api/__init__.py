"""What faces clients: the gRPC server and client, security, metrics, the Ray Serve pool."""
