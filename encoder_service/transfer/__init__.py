"""Moving rows by reference (NIXL): the agent both sides use (`nixl`), the endpoint's leases live in
`serving.api.leases`, a consumer's reads in `reader`."""
