"""Where the time went in a py-spy recording (collapsed stacks, ``py-spy record -f raw``, gzip ok).

Prints the share of samples per process/thread, then the busiest functions (self time: the
innermost frame, and total time: any frame on the stack) of each process.

usage: python bench/pyspy_top.py STACKS.txt[.gz] [--top N]
"""
from __future__ import annotations

import argparse
import collections
import gzip
import re


def read(path: str):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if stack and n.isdigit():
                yield stack.split(";"), int(n)


def frame_name(frame: str) -> str:
    return re.sub(r" \(.*\)$", "", frame)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stacks")
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args()
    threads: collections.Counter = collections.Counter()
    self_time: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total_time: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    samples = 0
    for frames, n in read(a.stacks):
        samples += n
        # --subprocesses: a child's stacks start with the parent's process frame, then its own.
        procs = [f for f in frames if f.startswith("process ")]
        proc = re.sub(r'^process \d+:"?', "", procs[-1])[:60] if procs else "?"
        thread = next((f for f in reversed(frames) if f.startswith("thread ")), "thread ?")
        threads[(proc, re.sub(r"\(\d+\)", "", thread))] += n
        code = [frame_name(f) for f in frames if not f.startswith(("process ", "thread "))]
        if code:
            self_time[proc][code[-1]] += n
            for name in set(code):
                total_time[proc][name] += n
    print(f"{samples} samples\n\n| process | thread | share |\n|---|---|---:|")
    for (proc, thread), n in threads.most_common(a.top):
        print(f"| {proc} | {thread} | {n / samples:.1%} |")
    for proc in sorted(self_time, key=lambda k: -sum(self_time[k].values())):
        n_proc = sum(self_time[proc].values())
        print(f"\n{proc}: {n_proc} samples\n\n| function | self | total |\n|---|---:|---:|")
        for name, n in total_time[proc].most_common(a.top):
            print(f"| {name} | {self_time[proc][name] / n_proc:.1%} | {n / n_proc:.1%} |")


if __name__ == "__main__":
    main()
