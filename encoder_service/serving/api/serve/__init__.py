"""The pool on Ray Serve: `deployment` (a replica: the model process behind the edge, gRPC and handle
doors), `app` (the application a Serve config builds), `routing` (content affinity), `autoscaling` (on the
encoder's real load), `local` (deploying from Python)."""
