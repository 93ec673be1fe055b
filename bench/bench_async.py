"""Asynchronous checkpoints: how long save() blocks, and what checkpointing costs a training loop.

    .venv/bin/python bench/bench_async.py [--reps 5]

(a) GPT-2-small-shaped state (497.8 MB) in a CheckpointManager: the time save() blocks with
    async_save=True and with async_save="lazy" (after a first save has allocated the staging
    buffers) vs a synchronous save of the same state, and the time until the async checkpoint
    is durable (save + wait).
(b) The demo's training loop (digits MLP): steps/s with no checkpoints vs a checkpoint every
    10 steps, synchronous, asynchronous and lazy, interleaved.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import gpt2_state_dict, nbytes, table  # noqa: E402

import tensorkeep as tk  # noqa: E402
from tensorkeep.demo import DigitsMLP, data  # noqa: E402


class Holder(torch.nn.Module):
    def __init__(self, sd: dict) -> None:
        super().__init__()
        self.p = torch.nn.ParameterList([torch.nn.Parameter(t) for t in sd.values()])


def stall(a: argparse.Namespace) -> list[tuple]:
    model = Holder(gpt2_state_dict())
    mb = nbytes(model.state_dict()) / 1e6
    runs = {m: os.path.join(a.dir, m) for m in ("sync", "async", "lazy")}
    for d in runs.values():
        shutil.rmtree(d, ignore_errors=True)
    sync = tk.CheckpointManager(runs["sync"], keep_last=1)
    asyn = tk.CheckpointManager(runs["async"], keep_last=1, async_save=True)
    lazy = tk.CheckpointManager(runs["lazy"], keep_last=1, async_save="lazy")
    for m in (asyn, lazy):
        m.save(0, {"model": model})  # allocates the staging buffers once
        m.wait()
    t_sync, t_block, t_durable, t_lazy = [], [], [], []
    for step in range(1, a.reps + 1):
        t = time.perf_counter()
        sync.save(step, {"model": model})
        t_sync.append(time.perf_counter() - t)
        t = time.perf_counter()
        asyn.save(step, {"model": model})
        t_block.append(time.perf_counter() - t)
        asyn.wait()
        t_durable.append(time.perf_counter() - t)
        t = time.perf_counter()
        lazy.save(step, {"model": model})
        t_lazy.append(time.perf_counter() - t)
        lazy.wait()
    sync.close()
    asyn.close()
    lazy.close()
    med = statistics.median
    return [
        (f"synchronous save ({mb:.0f} MB)", f"{med(t_sync) * 1e3:.0f}", f"{min(t_sync) * 1e3:.0f}", "100%"),
        ("async save(): time it blocks", f"{med(t_block) * 1e3:.0f}", f"{min(t_block) * 1e3:.0f}",
         f"{100 * med(t_block) / med(t_sync):.1f}%"),
        ("async_save='lazy': time save() blocks", f"{med(t_lazy) * 1e3:.1f}", f"{min(t_lazy) * 1e3:.1f}",
         f"{100 * med(t_lazy) / med(t_sync):.1f}%"),
        ("async save() + wait(): durable", f"{med(t_durable) * 1e3:.0f}", f"{min(t_durable) * 1e3:.0f}",
         f"{100 * med(t_durable) / med(t_sync):.0f}%"),
    ]


def train_loop(mode: str, steps: int, every: int, run: str) -> float:
    torch.manual_seed(0)
    Xtr, ytr, _, _ = data()
    model = DigitsMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    state = {"model": model, "optimizer": opt}
    shutil.rmtree(run, ignore_errors=True)
    modes = {"sync": False, "async": True, "lazy": "lazy"}
    mgr = tk.CheckpointManager(run, keep_last=2, async_save=modes[mode]) if mode != "none" else None
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(Xtr), (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
        opt.step()
        if mgr is not None and step % every == 0:
            mgr.save(step, state)
    if mgr is not None:
        mgr.close()  # includes waiting for the last async save
    return time.perf_counter() - t


def overhead(a: argparse.Namespace) -> list[tuple]:
    res: dict[str, list[float]] = {"none": [], "sync": [], "async": [], "lazy": []}
    for _ in range(a.reps):
        for mode in res:
            res[mode].append(train_loop(mode, a.steps, a.every, os.path.join(a.dir, "loop")))
    base = statistics.median(res["none"])
    rows = []
    for mode, xs in res.items():
        m = statistics.median(xs)
        rows.append((f"{a.steps} steps, {'no checkpoints' if mode == 'none' else mode + f' checkpoint every {a.every}'}",
                     f"{m * 1e3:.0f}", f"{min(xs) * 1e3:.0f}", f"{100 * (m / base - 1):+.1f}%"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--dir", default="/tmp/tk-bench-async")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores, {a.reps} reps\n")
    print(table(stall(a), ("GPT-2-small state in a CheckpointManager", "median ms", "min ms", "of sync save")))
    print()
    print(table(overhead(a), ("demo training loop (digits MLP)", "median ms", "min ms", "overhead")))
    shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
