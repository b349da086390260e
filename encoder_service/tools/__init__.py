"""Command-line tools built on the client: encoding files (`encode_files`) and load generation (`loadgen`)."""
