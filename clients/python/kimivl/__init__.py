"""kimivl: Kimi-VL serving — Python client, CLI and generated gRPC stubs (kimivl.v1)."""
