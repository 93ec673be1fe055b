"""Incremental checkpoints: a fine-tuning run whose backbone (90% of the bytes) is frozen.

    .venv/bin/python bench/bench_incremental.py [--reps 4] [--dir /tmp/tk-bench-inc]

GPT-2-small-shaped state (497.8 MB). The trainable tensors are the last ones of the model,
taken until they reach 10% of the bytes; each "training step" changes them in place. For
each mode the run saves a first checkpoint and then ``--reps`` later ones: bytes written by
each (from the manifest: tensor data + manifest) and save time, full vs incremental, runs
interleaved. A second table adds an Adam optimizer over the trainable part (its two moment
tensors change every step, so they are written every time too).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import gpt2_state_dict, nbytes, table

import tensorkeep as tk


class Holder(torch.nn.Module):
    def __init__(self, sd: dict) -> None:
        super().__init__()
        self.p = torch.nn.ParameterList([torch.nn.Parameter(t) for t in sd.values()])


def freeze_all_but_last(model: Holder, fraction: float) -> int:
    params = list(model.p)
    total = sum(p.numel() * 4 for p in params)
    trainable = 0
    for p in params:
        p.requires_grad_(False)
    for p in reversed(params):
        if trainable >= fraction * total:
            break
        p.requires_grad_(True)
        trainable += p.numel() * 4
    return trainable


def run(a: argparse.Namespace, with_adam: bool) -> list[tuple]:
    model = Holder(gpt2_state_dict())
    trainable = freeze_all_but_last(model, 0.10)
    opt = torch.optim.Adam([p for p in model.p if p.requires_grad], lr=1e-4) if with_adam else None
    total = nbytes(model.state_dict())
    dirs = {m: os.path.join(a.dir, m) for m in ("full", "incremental")}
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)
    mgrs = {m: tk.CheckpointManager(d, keep_last=2, incremental=(m == "incremental")) for m, d in dirs.items()}
    times: dict[str, list[float]] = {m: [] for m in mgrs}
    first_t: dict[str, float] = {}
    first_bytes: dict[str, int] = {}

    def step() -> None:
        with torch.no_grad():
            for p in model.p:
                if p.requires_grad:
                    p.add_(1e-3)
        if opt is not None:
            for p in model.p:
                if p.requires_grad:
                    p.grad = torch.randn_like(p) * 1e-3
            opt.step()

    state = {"model": model, **({"optimizer": opt} if opt is not None else {})}
    step()
    for m, mgr in mgrs.items():
        t = time.perf_counter()
        mgr.save(0, state)
        first_t[m] = time.perf_counter() - t
        first_bytes[m] = tk.list_checkpoints(dirs[m])[0].bytes_written
    for s in range(1, a.reps + 1):
        step()
        for m, mgr in list(mgrs.items()) if s % 2 else list(mgrs.items())[::-1]:  # interleaved, alternating
            t = time.perf_counter()
            mgr.save(s, state)
            times[m].append(time.perf_counter() - t)
    rows = []
    for m, mgr in mgrs.items():
        later = {c.step: c for c in tk.list_checkpoints(dirs[m])}[a.reps]
        rows.append((f"{m}: first checkpoint", f"{first_bytes[m] / 1e6:.1f}", "100%", f"{first_t[m] * 1e3:.0f}", "-"))
        rows.append(
            (
                f"{m}: later checkpoint",
                f"{later.bytes_written / 1e6:.1f}",
                f"{100 * later.bytes_written / first_bytes[m]:.1f}%",
                f"{statistics.median(times[m]) * 1e3:.0f}",
                f"{min(times[m]) * 1e3:.0f}",
            )
        )
        mgr.close()
    print(
        f"\nstate {total / 1e6:.1f} MB model{' + Adam' if with_adam else ''}; trainable {trainable / 1e6:.1f} MB "
        f"({100 * trainable / total:.1f}% of the model)"
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--dir", default="/tmp/tk-bench-inc")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    header = ("run", "MB written", "of first", "median ms", "min ms")
    for adam in (False, True):
        print(table(run(a, adam), header))
    shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
