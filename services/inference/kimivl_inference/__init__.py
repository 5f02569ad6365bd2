"""Inference tier (GPU): prepared prompts into vLLM, thinking and answer streamed apart."""
