"""Development commands (entry points in the ``kimivl.commands`` group)."""
from __future__ import annotations


def make_tiny_model(argv: list[str]) -> int:
    """write the tiny random-weight Kimi-VL used by tests"""
    from .tiny_model import main

    return main(argv)


def make_demo_model(argv: list[str]) -> int:
    """write the tiny trained Kimi-VL demo model that `make run` serves"""
    from .demo_model import main

    return main(argv)
