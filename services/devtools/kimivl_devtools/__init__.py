"""Development tools, not part of either production tier: model directories for tests and demos
(the tiny model), realistic dummy weights for benchmarks, and starting tiers as child processes
(tests, `make run`, benchmarks)."""
