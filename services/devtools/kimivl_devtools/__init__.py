"""Development tools: model directories for tests and demos (not needed to serve)."""
