"""Simulated power loss: the figures in RELIABILITY.md.

    .venv/bin/python bench/reliability.py [--samples 10000] [--only SUBSTRING]

For each scenario, record the file-system operations of one real save (tests/crashsim.py), then
build every state a power cut could leave (every cut point x every subset of the unsynced writes,
directory operations as an in-order prefix; where a cut has more than 1024 combinations,
--samples subsets are sampled over those cuts) and check each one with a fresh load/restore.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import crashsim


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    print(f"samples per scenario where enumeration is too big: {a.samples}\n")
    print("| scenario | ops logged | states checked | distinct states loaded | corrupt | lost | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    notes = []
    for name in [*crashsim.SCENARIOS, *crashsim.STRICT]:  # STRICT: strict POSIX directories, 50 samples a cut
        if a.only not in name:
            continue
        t = time.perf_counter()
        rep, _ = crashsim.run(name, samples=a.samples)
        print(f"{rep.row()} {time.perf_counter() - t:.1f} |", flush=True)
        if rep.examples:
            notes.append(f"- {name}: e.g. {rep.examples[0][:400]}")
    if notes:
        print("\nexamples of bad states:\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
