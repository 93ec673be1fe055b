"""Stress: does the demo's training compute bit-identically in every process, whatever the machine does?

    .venv/bin/python bench/stress_demo.py [--runs 16] [--epochs 1] [--max-load 2] [--seed 0] [--kernels]

Each run is a fresh process that trains the demo (tensorkeep.demo.setup/train_epoch) for
--epochs epochs and reports a digest of the exact training state (weights, optimizer, RNG)
after each epoch, with determinism.capture(). Each run draws its conditions at random:

  load      0..--max-load busy processes spinning beside it (started before it, so it starts
            on a loaded machine, and kept running while it trains)
  cpus      the CPUs it may use: all, or one (os.sched_setaffinity, like `taskset -c N`)
  omp       OMP_NUM_THREADS unset, 1, or the CPU count
  pinned    no: torch's defaults; yes: determinism.PINNED_ENV in its environment and
            determinism.pin() (one thread, deterministic algorithms)
  kernels   with --kernels also ATEN_CPU_CAPABILITY unset or "default" (torch's kernel choice)

It prints one line per run, then for unpinned and pinned runs separately: how many distinct
results there were, and whether the result is a function of the thread count (and kernels).
Exit status 1 if pinned runs ever disagree. A run takes a few seconds on an idle machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import subprocess
import sys
import time
from typing import Any

SPIN = "while True: pass"


def child(epochs: int, pin: bool) -> None:
    """One training process: prints a JSON line with its settings and one digest per epoch."""
    from tensorkeep import demo
    from tensorkeep.checkpoint import determinism

    if pin:
        determinism.pin()
    _, state, loader, val = demo.setup()
    out = []
    for _ in range(epochs):
        m = demo.train_epoch(state, loader, val)
        out.append([m["val_loss"], demo.digest(state)])
    print(json.dumps({"settings": determinism.capture(["cpu"]), "epochs": out}))


def run_once(cond: dict[str, Any], epochs: int) -> dict[str, Any]:
    from tensorkeep.checkpoint import determinism

    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY"):
        env.pop(k, None)
    if cond["omp"] is not None:
        env["OMP_NUM_THREADS"] = str(cond["omp"])
    if cond["kernels"] is not None:
        env["ATEN_CPU_CAPABILITY"] = cond["kernels"]
    if cond["pinned"]:
        env.update(determinism.PINNED_ENV)
    cpus = cond["cpus"]
    busy = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(cond["load"])]
    try:
        time.sleep(0.2 if busy else 0)  # let them take the CPUs first
        cmd = [sys.executable, __file__, "--child", "--epochs", str(epochs)] + (["--pin"] if cond["pinned"] else [])
        r = subprocess.run(
            cmd,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
    finally:
        for p in busy:
            p.kill()
            p.wait()
    if r.returncode:
        raise SystemExit(f"child failed ({cond}): {r.stderr[-2000:]}")
    return json.loads(r.stdout.splitlines()[-1])


def summarize(rows: list[tuple[dict, dict]], pinned: bool) -> bool:
    """Prints the distinct results among pinned (or unpinned) runs; True if they all agree."""
    rows = [(c, r) for c, r in rows if c["pinned"] == pinned]
    if not rows:
        return True
    results = collections.defaultdict(list)
    for c, r in rows:
        results[tuple(d for _, d in r["epochs"])].append((c, r))
    what = "pinned" if pinned else "unpinned"
    print(f"\n{what}: {len(rows)} runs, {len(results)} distinct result(s)")
    by_setting = collections.defaultdict(set)
    for key, members in results.items():
        threads = sorted({r["settings"]["threads"] for _, r in members})
        kernels = sorted({r["settings"]["cpu_capability"] for _, r in members})
        print(
            f"  epoch-1 val_loss {members[0][1]['epochs'][0][0]}  digest {key[-1]}: {len(members)} runs, "
            f"torch threads {threads}, kernels {kernels}"
        )
        for _, r in members:
            by_setting[(r["settings"]["threads"], r["settings"]["cpu_capability"])].add(key)
    if len(results) > 1:
        keyed = all(len(v) == 1 for v in by_setting.values())
        print(
            "  the result is "
            + (
                "a function of (torch threads, CPU kernels): the same settings always gave the same bits"
                if keyed
                else "NOT a function of the thread count and kernels alone"
            )
        )
    return len(results) == 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-load", type=int, default=2, help="most busy processes beside a run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kernels", action="store_true", help="also vary ATEN_CPU_CAPABILITY (unset/default)")
    ap.add_argument("--only", choices=["pinned", "unpinned"], help="draw only pinned or only unpinned runs")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pin", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.epochs, a.pin)
    rnd = random.Random(a.seed)
    all_cpus = sorted(os.sched_getaffinity(0))
    rows = []
    print(f"{a.runs} runs of {a.epochs} epoch(s); CPUs {all_cpus}; load 0..{a.max_load} busy processes")
    for i in range(a.runs):
        cond = {
            "load": rnd.randint(0, a.max_load),
            "cpus": rnd.choice([None] + [{c} for c in all_cpus]) if len(all_cpus) > 1 else None,
            "omp": rnd.choice([None, 1, len(all_cpus)]),
            "pinned": (a.only == "pinned") if a.only else rnd.random() < 0.5,
            "kernels": rnd.choice([None, "default"]) if a.kernels else None,
        }
        t0 = time.time()
        r = run_once(cond, a.epochs)
        rows.append((cond, r))
        s = r["settings"]
        cpus = ",".join(map(str, sorted(cond["cpus"]))) if cond["cpus"] else "all"
        print(
            f"  run {i + 1:2d}: load {cond['load']} cpus {cpus:4} "
            f"OMP_NUM_THREADS {str(cond['omp']):4} pinned {str(cond['pinned']):5} kernels {s['cpu_capability']:7} "
            f"-> threads {s['threads']}  val_loss {r['epochs'][0][0]}  digest {r['epochs'][-1][1]}  "
            f"({time.time() - t0:.0f} s)",
            flush=True,
        )
    summarize(rows, False)
    ok = summarize(rows, True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
