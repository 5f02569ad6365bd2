"""`kimivl`: one command line, whose subcommands each package registers for itself.

A package adds a command with an entry point in the ``kimivl.commands`` group: the name is the
command (``serve.<tier>`` for ``kimivl serve <tier>``), the value a function ``main(argv) -> int``
that parses its own arguments, in a module light enough to import for ``--help``, with the
extra that provides its dependencies in brackets. So the client install works without either
tier, and this dispatcher knows no tier by name.
"""
from __future__ import annotations

import sys
from importlib.metadata import EntryPoint, entry_points

GROUP = "kimivl.commands"
EXIT_USAGE = 2


def commands() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def _summary(ep: EntryPoint) -> str:
    try:
        doc = ep.load().__doc__ or ""
    except ImportError:
        doc = ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _usage(found: dict[str, EntryPoint], prefix: str = "") -> str:
    names = sorted(n for n in found if n.startswith(prefix))
    if prefix:
        lines = ["usage: kimivl serve TIER [options]   (kimivl serve TIER --help)", "", "tiers:"]
        lines += [f"  {n[len(prefix):]:<18}{_summary(found[n])}" for n in names]
    else:
        lines = ["usage: kimivl COMMAND [options]   (kimivl COMMAND --help)", "", "commands:"]
        if any("." in n for n in names):
            lines.append(f"  {'serve TIER':<18}run a server tier: " + ", ".join(
                n.split(".", 1)[1] for n in names if n.startswith("serve.")))
        lines += [f"  {n:<18}{_summary(found[n])}" for n in names if "." not in n]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    found = commands()
    if argv[:1] == ["serve"]:
        if len(argv) < 2 or argv[1].startswith("-") or f"serve.{argv[1]}" not in found:
            print(_usage(found, "serve."), file=sys.stderr if len(argv) > 1 and argv[1] not in ("-h", "--help")
                  else sys.stdout)
            return 0 if argv[1:2] in (["-h"], ["--help"]) else EXIT_USAGE
        name, rest = f"serve.{argv[1]}", argv[2:]
    elif argv and argv[0] in found and "." not in argv[0]:
        name, rest = argv[0], argv[1:]
    else:
        asked = argv[:1] in (["-h"], ["--help"])
        print(_usage(found), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else EXIT_USAGE
    ep = found[name]
    try:
        run = ep.load()
        return run(rest)
    except ModuleNotFoundError as e:
        hint = f" (install kimivl[{','.join(ep.extras)}])" if ep.extras else ""
        print(f"kimivl: cannot run {name.replace('.', ' ')}: {e}{hint}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
