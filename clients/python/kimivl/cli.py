"""`kimivl`: one command line for both tiers and the client.

Subcommands import their tier only when run, so the client install works without the
servers' dependencies and `--help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

EXIT_USAGE = 2

# name -> (module, help, extra that provides it); modules expose main(argv) -> int
PASS_THROUGH = {
    "preprocess": ("kimivl_preprocess.preprocess_cli", "preprocess images to an .npz, as the model sees them",
                   "preprocess"),
    "make-tiny-model": ("kimivl_devtools.tiny_model", "write the tiny random-weight Kimi-VL used by tests",
                        "dev"),
    "make-demo-model": ("kimivl_devtools.demo_model", "write the tiny trained Kimi-VL demo model `make run` serves",
                        "dev"),
    "doctor": ("kimivl_inference.doctor", "check the environment: Python, torch, GPU, engines, model directory",
               "inference"),
    "chat": ("kimivl.chat_cli", "chat with a running front door from the terminal", None),
}
SERVE = {
    "preprocess": ("kimivl_preprocess.options", "kimivl_preprocess.server", "the preprocessing tier (CPU, front door)",
                   "preprocess"),
    "inference": ("kimivl_inference.options", "kimivl_inference.server", "the inference tier (vLLM)", "inference"),
}


def _import(module: str, extra: str | None = None):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        hint = f" (install kimivl[{extra}])" if extra else ""
        print(f"kimivl: cannot load {module}: {e}{hint}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimivl", description="Kimi-VL serving: two gRPC tiers and a client")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="run a server tier")
    serve_sub = serve.add_subparsers(dest="tier", metavar="TIER", required=True)
    for tier, (opts, _, help_text, extra) in SERVE.items():
        p = serve_sub.add_parser(tier, help=help_text, description=f"Serve {help_text}.")
        _import(opts, extra).add_arguments(p)
    for name, (_, help_text, _) in PASS_THROUGH.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASS_THROUGH:
        module_name, _, extra = PASS_THROUGH[argv[0]]
        module = _import(module_name, extra)
        return module.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help()
        return EXIT_USAGE
    return _import(SERVE[args.tier][1], SERVE[args.tier][3]).main(args)


if __name__ == "__main__":
    sys.exit(main())
