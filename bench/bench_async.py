"""Asynchronous checkpoints: how long save() blocks, and what checkpointing costs a training loop.

    .venv/bin/python bench/bench_async.py [--reps 5] [--part all|stall|loop|cost]

(a) GPT-2-small-shaped state (497.8 MB) in a CheckpointManager: the time save() blocks with
    async_save=True and with async_save="lazy" (after a first save has allocated the staging
    buffers) vs a synchronous save of the same state, and the time until the async checkpoint
    is durable (save + wait).
(b) The demo's own training loop (tensorkeep.demo.train_epoch: digits MLP, AdamW, cosine
    schedule, validation, keep_last=3 + keep_best): time per epoch with a checkpoint every 1,
    2, 4 and 8 epochs (44 steps each) vs without, synchronous, asynchronous and lazy, in
    alternating segments of one run (--part loop).
(c) --part cost: the cost of one checkpoint to that loop, from one long randomized run (a coin
    flip per epoch decides whether it starts with a checkpoint), and the overhead it implies at
    a checkpoint every 1, 2, 4 and 8 epochs, with 95% intervals. More precise than (b) here.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import fsync_path, gpt2_state_dict, nbytes, table

import tensorkeep as tk
from tensorkeep.demo import setup, train_epoch


class Holder(torch.nn.Module):
    def __init__(self, sd: dict) -> None:
        super().__init__()
        self.p = torch.nn.ParameterList([torch.nn.Parameter(t) for t in sd.values()])


def stall(a: argparse.Namespace) -> list[tuple]:
    model = Holder(gpt2_state_dict())
    # "lazy" defers what an optimizer in the state steps (plain SGD: no state of its own)
    state = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.0)}
    mb = nbytes(model.state_dict()) / 1e6
    runs = {m: os.path.join(a.dir, m) for m in ("sync", "async", "lazy")}
    for d in runs.values():
        shutil.rmtree(d, ignore_errors=True)
    sync = tk.CheckpointManager(runs["sync"], keep_last=1)
    asyn = tk.CheckpointManager(runs["async"], keep_last=1, async_save=True)
    lazy = tk.CheckpointManager(runs["lazy"], keep_last=1, async_save="lazy")
    for m in (asyn, lazy):
        m.save(0, state)  # allocates the staging buffers once
        m.wait()
    t_sync, t_block, t_durable, t_lazy = [], [], [], []
    for step in range(1, a.reps + 1):
        t = time.perf_counter()
        sync.save(step, state)
        t_sync.append(time.perf_counter() - t)
        t = time.perf_counter()
        asyn.save(step, state)
        t_block.append(time.perf_counter() - t)
        asyn.wait()
        t_durable.append(time.perf_counter() - t)
        t = time.perf_counter()
        lazy.save(step, state)
        t_lazy.append(time.perf_counter() - t)
        lazy.wait()
    sync.close()
    asyn.close()
    lazy.close()
    med = statistics.median
    return [
        (f"synchronous save ({mb:.0f} MB)", f"{med(t_sync) * 1e3:.0f}", f"{min(t_sync) * 1e3:.0f}", "100%"),
        (
            "async save(): time it blocks",
            f"{med(t_block) * 1e3:.0f}",
            f"{min(t_block) * 1e3:.0f}",
            f"{100 * med(t_block) / med(t_sync):.1f}%",
        ),
        (
            "async_save='lazy': time save() blocks",
            f"{med(t_lazy) * 1e3:.1f}",
            f"{min(t_lazy) * 1e3:.1f}",
            f"{100 * med(t_lazy) / med(t_sync):.1f}%",
        ),
        (
            "async save() + wait(): durable",
            f"{med(t_durable) * 1e3:.0f}",
            f"{min(t_durable) * 1e3:.0f}",
            f"{100 * med(t_durable) / med(t_sync):.0f}%",
        ),
    ]


class SyscallsOnly:
    """A stand-in for an async CheckpointManager whose background thread makes only the
    syscalls of one demo checkpoint, with no Python work and no snapshot: a directory with
    ``files`` files of 250/``files`` kB, each fsynced, in a temporary directory, fsynced and
    renamed into place (the parent fsynced), and the checkpoint from 3 saves ago renamed away (the
    parent fsynced) and deleted: the commit and retention of a crash-proof checkpoint.
    ``files=5`` ("syscalls-only"): the demo's layout (4 files and the manifest); ``files=2``
    ("syscalls-min"): the fewest a crash-proof commit needs, one data file and its manifest."""

    def __init__(self, run: str, files: int = 5, parallel: bool = False) -> None:
        self.run, self.n, self.pending, self.files, self.parallel = run, 0, None, files, parallel
        self.pool = ThreadPoolExecutor(1)
        self.par = ThreadPoolExecutor(4)
        os.makedirs(run, exist_ok=True)

    def _write(self, n: int) -> None:
        tmp, d = os.path.join(self.run, f".{n}.tmp"), os.path.join(self.run, str(n))
        os.mkdir(tmp)

        def one(i: int) -> None:
            fd = os.open(os.path.join(tmp, f"{i}.tk"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.pwrite(fd, bytes(250_000 // self.files), 0)
            os.fsync(fd)
            os.close(fd)

        if self.parallel:  # the data files at once, then the manifest
            list(self.par.map(one, range(self.files - 1)))
            one(self.files - 1)
        else:
            for i in range(self.files):
                one(i)
        fsync_path(tmp)
        os.rename(tmp, d)  # the commit
        fsync_path(self.run)
        old = os.path.join(self.run, str(n - 3))
        if os.path.isdir(old):  # retention: out of the namespace durably, then its files
            os.rename(old, old + ".del")
            fsync_path(self.run)
            shutil.rmtree(old + ".del")

    def save(self, step: int, state: Any, metrics: Any = None) -> None:
        self.wait()
        self.n += 1
        self.pending = self.pool.submit(self._write, self.n)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def __enter__(self) -> SyscallsOnly:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wait()
        self.pool.shutdown()
        self.par.shutdown()


def segment(
    state: dict, loader: Any, val: tuple, mgr: tk.CheckpointManager | None, epochs: int, every: int, step: list
) -> float:
    """``epochs`` epochs of the demo's loop; with ``mgr``, a checkpoint at the start of every
    ``every``-th. The save comes first so that its background write overlaps this segment's
    training and the closing wait() finds it done: every cost of checkpointing lands in the segment."""
    t = time.perf_counter()
    for i in range(epochs):
        if mgr is not None and i % every == 0:
            step[0] += 1
            mgr.save(step[0], state, metrics=step[1])
        step[1] = train_epoch(state, loader, val)
    if mgr is not None:
        mgr.wait()
    return time.perf_counter() - t


def bootstrap(on: list[float], off: list[float], n: int = 4000) -> tuple[float, float]:
    """95% interval of the overhead sum(on)/sum(off) - 1, resampling the pairs."""
    rnd = random.Random(0)
    k = len(on)
    est = []
    for _ in range(n):
        idx = [rnd.randrange(k) for _ in range(k)]
        est.append(sum(on[i] for i in idx) / sum(off[i] for i in idx) - 1)
    est.sort()
    return est[int(0.025 * n)], est[int(0.975 * n)]


def overhead(a: argparse.Namespace) -> list[tuple]:
    """Alternate segments with and without checkpoints in one run, so slow drifts of this
    machine's speed (other tenants, CPU steal) hit both alike; the order flips every pair."""
    rows = []
    for every in a.every:
        for mode in a.modes:
            run = os.path.join(a.dir, "loop-" + mode)
            shutil.rmtree(run, ignore_errors=True)
            _, state, loader, val = setup()
            epochs = max(2, every)
            with _manager(mode, run) as mgr:
                step = [0, {}]
                segment(state, loader, val, mgr, 2, 1, step)  # warm-up: staging buffers, page cache, first files
                on, off, ratios, extra = [], [], [], []
                for i in range(a.pairs):
                    order = (mgr, None) if i % 2 == 0 else (None, mgr)
                    t = {id(m): segment(state, loader, val, m, epochs, every, step) for m in order}
                    on.append(t[id(mgr)])
                    off.append(t[id(None)])
                    ratios.append(on[-1] / off[-1] - 1)
                    extra.append((on[-1] - off[-1]) / (epochs // every))
            lo, hi = bootstrap(on, off)
            rows.append(
                (
                    f"{mode}, every {every} epoch{'s' if every > 1 else ''} ({44 * every} steps)",
                    f"{1e3 * sum(off) / len(off) / epochs:.1f}",
                    f"{1e3 * sum(on) / len(on) / epochs:.1f}",
                    f"{100 * (sum(on) / sum(off) - 1):+.1f}%",
                    f"{100 * lo:+.1f}% .. {100 * hi:+.1f}%",
                    f"{100 * statistics.median(ratios):+.1f}%",
                    f"{1e3 * statistics.median(extra):.1f}",
                )
            )
    return rows


def _manager(mode: str, run: str) -> Any:
    shutil.rmtree(run, ignore_errors=True)
    if mode == "syscalls-only":
        return SyscallsOnly(run)
    if mode == "syscalls-par":  # the demo's layout, its 4 data files written and fsynced at once
        return SyscallsOnly(run, parallel=True)
    if mode == "syscalls-min":  # the fewest a crash-proof commit needs: one data file and its manifest
        return SyscallsOnly(run, files=2)
    base, *opts = mode.split("-")  # "-inc": incremental=True (packs); "-one": one_file=True (state.tk)
    async_save = {"sync": False, "async": True, "lazy": "lazy"}[base]
    return tk.CheckpointManager(
        run,
        keep_last=3,
        keep_best=("val_loss", "min"),
        async_save=async_save,
        incremental="inc" in opts,
        one_file="one" in opts,
    )


def _fit(y: np.ndarray, c: np.ndarray, block: int) -> float:
    """Least-squares cost of a checkpoint: its effect on the epoch it starts plus on the next
    one, with a separate mean for every ``block`` consecutive epochs (this machine drifts)."""
    n = len(y)
    X = np.zeros((n - 1, 2 + (n - 1 + block - 1) // block))
    X[:, 0], X[:, 1] = c[1:], c[:-1]
    X[np.arange(n - 1), 2 + np.arange(n - 1) // block] = 1.0
    beta = np.linalg.lstsq(X, y[1:], rcond=None)[0]
    return float(beta[0] + beta[1])


def cost(a: argparse.Namespace) -> list[tuple]:
    """A randomized design: one long run of the demo's loop where each epoch starts with a
    checkpoint or not by a coin flip, so neither drift nor any periodic pattern of this machine
    can line up with the checkpoints. The cost per checkpoint is fitted from the epoch times
    (within blocks of 10 epochs, counting the epoch after a checkpoint too), with a 95% interval
    from resampling whole blocks; the overhead at a checkpoint every N epochs is that cost over
    N epochs of training."""
    rows = []
    for mode in a.modes:
        _, state, loader, val = setup()
        rnd = random.Random(1)
        with _manager(mode, os.path.join(a.dir, "cost-" + mode)) as mgr:
            metrics: dict = {}
            for i in range(3):  # warm-up: staging buffers, page cache, first files
                mgr.save(i, state, metrics=metrics)
                metrics = train_epoch(state, loader, val)
            step, times, flips = 3, [], []
            for _ in range(a.epochs):
                flip = rnd.random() < 0.5
                t = time.perf_counter()
                if flip:
                    mgr.save(step, state, metrics=metrics)
                    step += 1
                metrics = train_epoch(state, loader, val)
                times.append(time.perf_counter() - t)
                flips.append(flip)
        y, c, block = np.array(times), np.array(flips, dtype=float), 10
        ms = 1e3 * _fit(y, c, block)
        starts = np.arange(0, len(y) - block + 1, block)
        boot = []
        for _ in range(1000):
            idx = np.concatenate([np.arange(s, s + block) for s in rnd.choices(list(starts), k=len(starts))])
            boot.append(1e3 * _fit(y[idx], c[idx], block))
        lo, hi = np.percentile(boot, [2.5, 97.5])
        epoch = 1e3 * float(np.mean(y[1:][(c[1:] == 0) & (c[:-1] == 0)]))
        rows.append(
            (
                mode,
                f"{epoch:.1f}",
                f"{ms:.1f} [{lo:.1f}, {hi:.1f}]",
                *(
                    f"{100 * ms / (n * epoch):.1f}% [{100 * lo / (n * epoch):.1f}, {100 * hi / (n * epoch):.1f}]"
                    for n in a.every
                ),
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=60, help="segments with / without checkpoints")
    ap.add_argument(
        "--every",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1, 2, 4, 8],
        help="epochs (44 steps each) between checkpoints, a comma-separated list",
    )
    ap.add_argument(
        "--modes",
        type=lambda v: v.split(","),
        default=["sync", "async", "lazy"],
        help="of sync, async, lazy (each also with -inc: incremental=True, or -one: one_file=True), syscalls-only, "
        "syscalls-par and syscalls-min "
        "(see SyscallsOnly)",
    )
    ap.add_argument("--dir", default="/tmp/tk-bench-async")
    ap.add_argument("--part", choices=("all", "stall", "loop", "cost"), default="all")
    ap.add_argument("--epochs", type=int, default=600, help="epochs of the randomized run (--part cost)")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores, {a.reps} reps\n")
    if a.part in ("all", "stall"):
        print(table(stall(a), ("GPT-2-small state in a CheckpointManager", "median ms", "min ms", "of sync save")))
        print()
    if a.part == "cost":
        print(
            table(
                cost(a),
                (
                    "randomized run of the demo loop",
                    "ms/epoch",
                    "ms per checkpoint [95%]",
                    *(f"every {n} epoch{'s' if n > 1 else ''} ({44 * n} steps)" for n in a.every),
                ),
            )
        )
    elif a.part != "stall":
        print(
            table(
                overhead(a),
                (
                    "demo training loop (digits MLP)",
                    "ms/epoch without",
                    "ms/epoch with",
                    "overhead",
                    "95% interval",
                    "median pair",
                    "ms per checkpoint",
                ),
            )
        )
    shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
