"""What both tiers agree on beyond the protos, in one home that imports neither tier.

* :mod:`.errors` — request errors, each with its gRPC status code, and how a server answers one.
* :mod:`.limits` — checks of generation options (sampling, thinking).
* :mod:`.prepared` — checks of PreparedPrompt messages before they reach the engine.
* :mod:`.dtypes` — the TensorDtype table (names, element sizes).
* :mod:`.tokens` — Kimi-VL's special tokens and thinking markers.
* :mod:`.processor` — the Kimi-VL image processor's settings, resize rule and normalization.

Installed with the project's base (client) install: grpcio and protobuf; numpy only where a
check needs it (imported there).
"""
