"""The preprocessing tier's commands (entry points in the ``kimivl.commands`` group).

Light on purpose: listing commands imports this module; each command imports its work when run.
"""
from __future__ import annotations

import argparse


def serve(argv: list[str]) -> int:
    """the preprocessing tier (CPU, front door)"""
    from . import options

    parser = argparse.ArgumentParser(prog="kimivl serve preprocess",
                                     description="Serve the preprocessing tier (CPU, front door).")
    options.add_arguments(parser)
    args = parser.parse_args(argv)
    from .server import main

    return main(args)


def preprocess(argv: list[str]) -> int:
    """preprocess images to an .npz, as the model sees them"""
    from .preprocess_cli import main

    return main(argv)
