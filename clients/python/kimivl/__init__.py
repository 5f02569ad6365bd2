"""kimivl: Kimi-VL serving. This package is the client side: the Python SDK (kimivl.client),
`kimivl chat`, the `kimivl` command dispatcher and the generated gRPC stubs (kimivl.v1)."""
