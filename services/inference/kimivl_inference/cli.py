"""The inference tier's commands (entry points in the ``kimivl.commands`` group).

Light on purpose: listing commands imports this module; each command imports its work when run.
"""
from __future__ import annotations

import argparse


def serve(argv: list[str]) -> int:
    """the inference tier (vLLM)"""
    from . import options

    parser = argparse.ArgumentParser(prog="kimivl serve inference", description="Serve the inference tier (vLLM).")
    options.add_arguments(parser)
    args = parser.parse_args(argv)
    from .server import main

    return main(args)


def doctor(argv: list[str]) -> int:
    """check the environment: Python, torch, GPU, vLLM, model directory"""
    from .doctor import main

    return main(argv)
