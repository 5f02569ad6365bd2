"""`kimivl chat`: talk to a running front door from the terminal.

    kimivl chat --image cat.jpg "What is this?" --image dog.png "And this?"

Text arguments and `--image` options keep their order on the command line, so images
interleave with text. Thinking streams dim (or is hidden with --no-thinking), the answer
in full colour, then a line of usage and timings. `--json` writes one JSON object a line
for scripts. Exit codes: 0 done, 2 bad arguments, 3 a gRPC error (the status is printed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console

from kimivl.client import Client, KimiVLError, build_request

API_KEY_ENV = "KIMIVL_API_KEY"
EXIT_USAGE = 2
EXIT_RPC = 3


def _split_parts(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list, list[str]]:
    """Pull text arguments and --image options out of argv in command-line order
    (argparse would group positionals apart from options); return (parts, rest)."""
    takes_value = {s for a in parser._actions if a.nargs != 0 for s in a.option_strings}
    parts, rest, i = [], [], 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--image" and i + 1 < len(argv):
            parts.append(("image", argv[i + 1]))
            i += 2
        elif tok.startswith("--image="):
            parts.append(("image", tok.split("=", 1)[1]))
            i += 1
        elif tok == "--":
            parts.extend(("text", t) for t in argv[i + 1:])
            break
        elif tok.startswith("-") and len(tok) > 1:
            rest.append(tok)
            if tok in takes_value and i + 1 < len(argv):
                rest.append(argv[i + 1])
                i += 1
            i += 1
        else:
            parts.append(("text", tok))
            i += 1
    return parts, rest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kimivl chat", description="Chat with Kimi-VL through the front door.")
    p.add_argument("text", nargs="*", help="text parts, in order")
    p.add_argument("--image", action="append", metavar="PATH_OR_URL",
                   help="an image file, http(s) URL or data URI; repeat and interleave with text")
    p.add_argument("--target", default="localhost:50051", help="front door address (default %(default)s)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--no-thinking", action="store_true", help="hide thinking (it is still generated and counted)")
    p.add_argument("--max-thinking-tokens", type=int, help="thinking budget; then the model must answer")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--timeout-s", type=float, default=600.0, help="deadline for the whole call")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"the front door's API key, sent as authorization: Bearer KEY (default: ${API_KEY_ENV})")
    p.add_argument("--header", action="append", default=[], metavar="KEY=VALUE",
                   help="metadata sent with the call, e.g. authorization=Bearer...")
    p.add_argument("--json", action="store_true", help="one JSON event a line")
    return p


def _content(parts) -> list:
    out = []
    for kind, value in parts:
        if kind == "text":
            out.append(value)
        elif value.startswith(("http://", "https://", "data:")):
            out.append(value)
        else:
            path = Path(value)
            if not path.is_file():
                raise ValueError(f"--image {value}: no such file")
            out.append(path)
    return out


def main(argv: list[str]) -> int:
    """chat with a running front door from the terminal"""
    parser = _parser()
    parts, rest = _split_parts(parser, argv)
    try:
        args = parser.parse_args(rest)
    except SystemExit as e:
        return EXIT_USAGE if e.code else 0
    err = Console(stderr=True)
    if not parts:
        err.print("kimivl chat: give some text and/or --image")
        return EXIT_USAGE
    try:
        metadata = [tuple(h.split("=", 1)) for h in args.header]
        if any(len(m) != 2 for m in metadata):
            raise ValueError("--header must be KEY=VALUE")
        sampling = {k: v for k, v in dict(max_tokens=args.max_tokens, temperature=args.temperature,
                                           top_p=args.top_p, seed=args.seed).items() if v is not None}
        request = build_request(_content(parts), system=args.system, sampling=sampling,
                                exclude_thinking=args.no_thinking, max_thinking_tokens=args.max_thinking_tokens)
    except (ValueError, OSError) as e:
        err.print(f"kimivl chat: {e}")
        return EXIT_USAGE
    with Client(args.target, api_key=args.api_key, tls=args.tls, metadata=metadata,
                timeout_s=args.timeout_s) as client:
        try:
            if args.json:
                stream_json(client, request)
            else:
                render(client.stream(request=request), Console(highlight=False, soft_wrap=True))
        except KimiVLError as e:
            if args.json:
                print(json.dumps({"error": {"code": e.code.name, "message": e.details}}), flush=True)
            err.print(f"kimivl chat: [bold red]{e.code.name}[/]: {e.details}")
            return EXIT_RPC
        except KeyboardInterrupt:
            return 130
    return 0


def stream_json(client: Client, request) -> None:
    for ev in client.stream(request=request):
        if ev.result is not None:
            print(json.dumps({"result": result_dict(ev.result)}), flush=True)
        else:
            print(json.dumps({"thinking": ev.thinking, "answer": ev.answer, "token_ids": ev.token_ids}), flush=True)


def result_dict(r) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(r, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def render(events, console: Console) -> None:
    """Live view: a spinner until the first token, thinking dim, answer bright, then usage."""
    status = console.status("uploading and preprocessing…", spinner="dots")
    status.start()
    started = False
    section = None
    try:
        for ev in events:
            if not started:
                status.stop()
                started = True
            if ev.result is not None:
                console.print()
                console.print(usage_line(ev.result), style="cyan")
                break
            if ev.thinking:
                if section != "thinking":
                    console.print("[dim italic]thinking…[/]")
                    section = "thinking"
                console.print(ev.thinking, style="dim", end="", markup=False)
            if ev.answer:
                if section != "answer":
                    if section == "thinking":
                        console.print()
                    console.print("[bold]answer[/]")
                    section = "answer"
                console.print(ev.answer, end="", markup=False)
    finally:
        if not started:
            status.stop()


def usage_line(r) -> str:
    from kimivl.v1 import types_pb2

    u, t = r.usage, r.timings
    reason = types_pb2.FinishReason.Name(r.finish_reason).removeprefix("FINISH_REASON_").lower()
    extra = " (ended while thinking)" if r.ended_in_thinking else ""
    extra += " (thinking budget reached)" if r.thinking_budget_reached else ""
    return (f"── {reason}{extra} · prompt {u.prompt_tokens} tok ({u.image_tokens} image, {u.cached_prompt_tokens} "
            f"cached) · thinking {u.thinking_tokens} · answer {u.answer_tokens} · preprocess {t.preprocess_ms:.0f} ms"
            f" · first token {t.time_to_first_token_ms:.0f} ms · total {t.total_ms:.0f} ms")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
