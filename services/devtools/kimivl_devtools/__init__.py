"""Development tools, not part of either production tier: the tiny model, realistic dummy
weights for benchmarks, and starting tiers as child processes (tests, `make run`, benchmarks)."""
