"""How a kimivl tier is hosted, the same for both: the gRPC server with health and reflection,
binding, signals and draining (:mod:`.grpc_host`). Imports neither tier."""
