"""The order of measured units (one system, one phase, one repeat).

Co-resident (``--co-resident``): every system is started once, then each round runs one phase of
one repeat on every system in turn, so repeats interleave: A B C, A B C, ... (``--order fixed``)
or A B C, B C A, C A B (``--order rotate``, the default: every system takes every position, so
what runs first or after whom is spread over the repeats). Each unit gets the same untimed
warm-up first. A fresh system's first burst (``--fresh-burst``) comes before anything else;
phases named in ``--late`` run after every round of the others (what a deadline cuts first).

One at a time (the default): each system is started, runs all its units (repeats back to back),
and is stopped before the next starts; consecutive ours:N with the same flags keep their tier.
"""
from __future__ import annotations

import fnmatch

from .workloads import FRESH_PHASE


def parse_repeats_for(text: str | None) -> list[tuple[str, int]]:
    """"photos/burst=3,documents=1,photos/poisson@*=1" -> [(pattern, n)]; later items win."""
    out = []
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        pat, eq, n = item.rpartition("=")
        if not eq or not pat:
            raise SystemExit(f"--repeats-for {item!r}: WORKLOAD[/PHASE]=N (PHASE may use * and ?)")
        out.append((pat, int(n)))
    return out


def repeats_of(w: str, phase: str, default: int, overrides: list[tuple[str, int]]) -> int:
    n = default
    for pat, k in overrides:
        wp, _, pp = pat.partition("/")
        if fnmatch.fnmatchcase(w, wp) and (not pp or fnmatch.fnmatchcase(phase, pp)):
            n = k
    return max(0, n)


def parse_phase_systems(text: str | None, known: list[str]) -> list[tuple[str, list[str]]]:
    """"idle=ours|ceiling,documents/poisson@10=ours" -> [(pattern, systems)]; later items win."""
    out = []
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        pat, eq, names = item.partition("=")
        chosen = [n.strip() for n in names.split("|") if n.strip()]
        if not eq or not pat or not chosen:
            raise SystemExit(f"--phase-systems {item!r}: WORKLOAD[/PHASE]=SYSTEM|SYSTEM...")
        unknown = [n for n in chosen if n not in known]
        if unknown:
            raise SystemExit(f"--phase-systems {item!r}: {unknown} not in --systems")
        out.append((pat, chosen))
    return out


def systems_of(w: str, phase: str, systems: list[str], overrides) -> list[str]:
    chosen = systems
    for pat, names in overrides:
        wp, _, pp = pat.partition("/")
        if fnmatch.fnmatchcase(w, wp) and (not pp or fnmatch.fnmatchcase(phase, pp)):
            chosen = names
    return [s for s in systems if s in chosen]  # in --systems order, so rotation stays fair


def build(systems: list[str], phases: list[tuple[str, str]], *, repeats: int, overrides, fresh: list[str],
          order: str, co_resident: bool, phase_systems=(), late=()) -> list[dict]:
    """Units in run order. ``phases``: (workload, phase) in workload order."""
    reps = {(w, p): repeats_of(w, p, repeats, overrides) for w, p in phases}
    who = {(w, p): systems_of(w, p, systems, phase_systems) for w, p in phases}
    rounds = max(reps.values(), default=0)
    units = []

    def unit(s, w, p, r, **kw):
        units.append({"seq": len(units) + 1, "system": s, "workload": w, "phase": p, "repeat": r, **kw})

    if co_resident:
        for s in fresh:
            unit(s, "photos", FRESH_PHASE, 0, fresh=True, round=0)
        early = [ph for ph in phases if not _matches(ph, late)]
        for group in (early, [ph for ph in phases if ph not in early]):  # --late phases after all other rounds
            for r in range(rounds):
                k = r % max(1, len(systems))
                turn = systems[k:] + systems[:k] if order == "rotate" else systems
                for w, p in group:
                    if reps[(w, p)] > r:
                        for s in turn:
                            if s in who[(w, p)]:
                                unit(s, w, p, r, round=r + 1)
    else:
        for s in systems:
            if s in fresh:
                unit(s, "photos", FRESH_PHASE, 0, fresh=True, round=0)
            for r in range(rounds):
                for w, p in phases:
                    if reps[(w, p)] > r and s in who[(w, p)]:
                        unit(s, w, p, r, round=r + 1)
    return units


def _matches(ph: tuple[str, str], patterns) -> bool:
    w, p = ph
    for pat in patterns:
        wp, _, pp = pat.partition("/")
        if fnmatch.fnmatchcase(w, wp) and (not pp or fnmatch.fnmatchcase(p, pp)):
            return True
    return False


def describe(units: list[dict]) -> list[str]:
    """The order, one line per round of one phase: "r1 photos/burst: ours:12 → ceiling"."""
    lines, cur, names = [], None, []
    for u in units:
        key = (u["round"], u["workload"], u["phase"])
        if key != cur and names:
            lines.append(_line(cur, names))
            names = []
        cur = key
        names.append(f"{u['system']}" + ("" if u.get("status", "ok") == "ok" else f" ({u['status']})"))
    if names:
        lines.append(_line(cur, names))
    return lines


def _line(key, names) -> str:
    rnd, w, p = key
    return f"{'fresh' if rnd == 0 else f'r{rnd}'} {w}/{p}: " + " → ".join(names)
