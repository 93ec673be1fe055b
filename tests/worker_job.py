"""A training job whose loader workers augment every sample with torch, random and NumPy.

    python worker_job.py RUN_DIR OUT_FILE [--workers N] [--persistent] [--seeding none|sample]
                         [--epochs E] [--save-every K] [--sleep S]
    python worker_job.py --serve    (fork jobs from this pre-imported process; see serve())

Checkpoints every K steps mid-epoch with torchdata's StatefulDataLoader (shuffle, dropout,
BatchNorm, AdamW, a per-batch scheduler), creating iterators under tk.keep_rng(). With
``--seeding sample`` each sample's augmentation is seeded by tk.SampleRNG from (seed, epoch,
index); with ``none`` it draws from the generators of whichever process fetches it. Prints
"WORKERS <pids>" once the loader's workers run, "STEP n" after each step, "SAVING n" before and
"COMMITTED n" after each save. Runs pinned (determinism.pin; start it with PINNED_ENV).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.util
import os
import random
import sys
import time
import traceback

import numpy as np
import torch
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

import tensorkeep as tk
from tensorkeep.checkpoint import determinism


class Augmented(torch.utils.data.Dataset):
    """Noise (torch), a random flip (random) and a random mask (NumPy) on every sample."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seeding: str) -> None:
        self.x, self.y, self.seeding = x, y, seeding
        self.rng = tk.SampleRNG(seed=1234)

    def __len__(self) -> int:
        return len(self.x)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 0.3 * torch.randn_like(x)
        if random.random() < 0.5:
            x = x.flip(0)
        keep = torch.from_numpy((np.random.rand(x.numel()) > 0.2).astype(np.float32))
        return x * keep

    def __getitem__(self, i: int):
        if self.seeding == "sample":
            with self.rng(i):
                return self.augment(self.x[i]), self.y[i]
        return self.augment(self.x[i]), self.y[i]


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("out")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--persistent", action="store_true")
    ap.add_argument("--seeding", choices=["none", "sample"], default="sample")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per step, to give the killer time")
    a = ap.parse_args(argv)
    determinism.pin()
    torch.manual_seed(0)  # a real script seeds all three: the main process augments when workers=0
    random.seed(0)
    np.random.seed(0)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(384, 16, generator=g)
    y = (x[:, :4].sum(1) > 0).long()
    ds = Augmented(x, y, a.seeding)
    model = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.9)  # stepped every batch
    loader = StatefulDataLoader(ds, batch_size=32, shuffle=True, num_workers=a.workers, persistent_workers=a.persistent)
    loss_fn = nn.CrossEntropyLoss()
    state = {"model": model, "optimizer": opt, "scheduler": sched, "loader": loader}
    with tk.CheckpointManager(a.run, keep_last=2) as mgr:
        step = mgr.restore(state) or 0
        print("RESUMED", step, flush=True)
        total, shown = a.epochs * len(loader), False
        while step < total:
            ds.rng.set_epoch(step // len(loader))  # in every run: the workers read it per sample
            with tk.keep_rng():  # creating the iterator must not move the global RNG
                it = iter(loader)
            if not shown and a.workers:
                print("WORKERS", *sorted(c.pid for c in multiprocessing.active_children()), flush=True)
                shown = True
            for xb, yb in it:
                model.train()
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                print("STEP", step, flush=True)
                if a.sleep:
                    time.sleep(a.sleep)
                if step % a.save_every == 0 or step == total:
                    print("SAVING", step, flush=True)
                    mgr.save(step, state, metrics={"loss": loss.item()})
                    print("COMMITTED", step, flush=True)
                if step >= total:
                    break
    tk.save(model.state_dict(), a.out)
    print("DONE", flush=True)


def serve() -> None:
    """Run jobs forked from this process, which imported torch once (an import costs seconds).

    One JSON command per line on stdin, one reply line on stdout:
    ``["run", argv, log]`` forks a job writing its stdout and stderr to ``log`` (its last line
    ``EXITED <code>`` unless it was killed): ``PID <pid>``;
    ``["wait", pid]`` reaps it: ``EXIT <code>`` (negative: killed by that signal)."""
    determinism.pin()  # its first call imports torch's compiler stack (seconds): once, here
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd[0] == "run":
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    fd = os.open(cmd[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                    os.close(fd)
                    main(cmd[1])
                    code = 0
                except BaseException:  # reported in the log, and by the exit code
                    traceback.print_exc()
                finally:
                    print("EXITED", code, flush=True)
                    sys.stdout.flush()
                    sys.stderr.flush()
                    multiprocessing.util._exit_function()  # stop the loader's daemonic workers, as a real exit does
                    os._exit(code)
            print("PID", pid, flush=True)
        elif cmd[0] == "wait":
            print("EXIT", os.waitstatus_to_exitcode(os.waitpid(cmd[1], 0)[1]), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        main(sys.argv[1:])
