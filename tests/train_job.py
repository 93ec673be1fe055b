"""A small training job for the resume tests: run, get killed, run again, compare.

    python train_job.py RUN_DIR OUT_FILE --recipe epoch|mid [--epochs N] [--save-every K]

Prints "COMMITTED <step>" after every save returns. With --recipe epoch it checkpoints at
epoch ends with a shuffling torch DataLoader; with --recipe mid it checkpoints every K steps
mid-epoch with torchdata's StatefulDataLoader, creating iterators under tk.keep_rng().
It runs pinned (one thread, deterministic algorithms): torch's default thread count follows
the CPUs a process may use, and a different count rounds differently.
"""

import argparse
import sys
import time

import torch
from torch import nn

import tensorkeep as tk
from tensorkeep.checkpoint import determinism


def make(seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(123)
    X = torch.randn(512, 16, generator=g)
    Y = (X[:, :4].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
    return X, Y, model, opt, sched


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("out")
    ap.add_argument("--recipe", choices=["epoch", "mid"], default="epoch")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per step, to give the killer time")
    a = ap.parse_args()
    determinism.pin()
    X, Y, model, opt, sched = make()
    ds = torch.utils.data.TensorDataset(X, Y)
    loss_fn = nn.CrossEntropyLoss()

    def train_step(x, y):
        model.train()
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if a.sleep:
            time.sleep(a.sleep)
        return float(loss.detach())

    with tk.CheckpointManager(a.run, keep_last=2) as mgr:
        if a.recipe == "epoch":
            loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True)
            state = {"model": model, "optimizer": opt, "scheduler": sched}
            start = mgr.restore(state) or 0
            for epoch in range(start, a.epochs):
                for x, y in loader:
                    loss = train_step(x, y)
                sched.step()
                mgr.save(epoch + 1, state, metrics={"loss": loss})
                print("COMMITTED", epoch + 1, flush=True)
        else:
            from torchdata.stateful_dataloader import StatefulDataLoader

            loader = StatefulDataLoader(ds, batch_size=32, shuffle=True)
            state = {"model": model, "optimizer": opt, "scheduler": sched, "loader": loader}
            step = mgr.restore(state) or 0
            total = a.epochs * len(loader)
            while step < total:
                with tk.keep_rng():  # creating the iterator must not move the global RNG
                    it = iter(loader)
                for x, y in it:
                    loss = train_step(x, y)
                    step += 1
                    if step % len(loader) == 0:
                        sched.step()
                    if step % a.save_every == 0 or step == total:
                        mgr.save(step, state, metrics={"loss": loss})
                        print("COMMITTED", step, flush=True)
                    if step >= total:
                        break
    tk.save(model.state_dict(), a.out)
    print("DONE", flush=True)


if __name__ == "__main__":
    sys.exit(main())
