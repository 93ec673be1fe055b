"""``make demo``: a training run survives a power cut and resumes bit-exactly.

    python -m tensorkeep.demo [--dir demo-run]

It trains a small MLP on scikit-learn's handwritten digits (shipped with the package, no
download) with a CheckpointManager, kills the training process with SIGKILL part-way,
starts it again, and shows that the resumed run ends bit-identical to one that was never
interrupted; then it lists the kept checkpoints, rolls back to the best one, and reuses
the first layer in a smaller model.

A resumed run can only match when the arithmetic itself is reproducible: torch's thread count
follows the CPUs a process may use, and a different count changes how sums are split and so
their rounding. Every training process is therefore pinned (``determinism.PINNED_ENV`` before
torch starts, ``determinism.pin()``: one thread, deterministic algorithms). Each process
reports a digest of its exact state after every epoch; when the final weights differ, the
demo tells a resume problem (exit 1) from a machine whose arithmetic was not reproducible
(exit 3: the two runs differed before any kill, ran with different settings, or the
uninterrupted run itself does not repeat).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import tensorkeep as tk
from tensorkeep.checkpoint import determinism

EPOCHS = 12
KILL_AFTER = 5


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 128):
        super().__init__()
        self.hidden1 = nn.Linear(64, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(0.2)
        self.hidden2 = nn.Linear(hidden, 64)
        self.output = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.relu(self.norm(self.hidden1(x))))
        return self.output(F.relu(self.hidden2(x)))


class SmallNet(nn.Module):
    """Reuses DigitsMLP's first layer, with a new, smaller head."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden1 = nn.Linear(64, 128)
        self.output = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(F.relu(self.hidden1(x)))


def data() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(X), generator=g)
    tr, va = perm[:1400], perm[1400:]
    return X[tr], y[tr], X[va], y[va]


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def setup() -> tuple[nn.Module, dict, torch.utils.data.DataLoader, tuple[torch.Tensor, torch.Tensor]]:
    """The demo's model, its training state, the shuffling loader and the validation set."""
    torch.manual_seed(0)
    Xtr, ytr, Xva, yva = data()
    model = DigitsMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xtr, ytr), batch_size=32, shuffle=True)
    return model, {"model": model, "optimizer": opt, "scheduler": sched}, loader, (Xva, yva)


def train_epoch(state: dict, loader: Any, val: tuple[torch.Tensor, torch.Tensor], slow: float = 0.0) -> dict:
    """One epoch of the demo's training loop (44 steps); returns the metrics to checkpoint with."""
    model, opt = state["model"], state["optimizer"]
    model.train()
    for xb, yb in loader:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        if slow:
            time.sleep(slow)
    state["scheduler"].step()
    model.eval()
    with torch.no_grad():
        val_loss = float(F.cross_entropy(model(val[0]), val[1]))
    return {"val_loss": round(val_loss, 5), "val_acc": round(accuracy(model, *val), 4)}


def digest(state: dict) -> str:
    """A short hash of the exact bytes of a training state: weights, optimizer, learning rates, torch's RNG.

    >>> _, state, _, _ = setup(); digest(state) == digest(state)
    True
    """
    h = hashlib.sha256()
    opt = state["optimizer"]
    tensors = [*state["model"].state_dict().values(), torch.get_rng_state()]
    for group in opt.param_groups:
        h.update(repr(group["lr"]).encode())
        for p in group["params"]:
            s = opt.state.get(p, {})
            tensors += [s[k] for k in sorted(s) if isinstance(s[k], torch.Tensor)]
    for t in tensors:
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def train(run: str, out: str, slow: float, epochs: int = EPOCHS) -> None:
    """The training script: resumes from the newest checkpoint, checkpoints every epoch."""
    determinism.pin()  # one thread, deterministic algorithms: the bits must not depend on the CPUs it gets
    model, state, loader, val = setup()
    print("SETTINGS", json.dumps(determinism.capture(["cpu"])), flush=True)
    with tk.CheckpointManager(run, keep_last=3, keep_best=("val_loss", "min")) as mgr:
        start = mgr.restore(state) or 0
        print(f"RESUMED {start} {digest(state)}" if start else "FRESH", flush=True)
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover
            tqdm = None
        for epoch in range(start, epochs):
            batches = (
                tqdm(
                    loader,
                    desc=f"  epoch {epoch + 1:2d}/{EPOCHS}",
                    leave=False,
                    file=sys.stderr,
                    ncols=70,
                    disable=not sys.stderr.isatty(),
                )
                if tqdm
                else loader
            )
            metrics = train_epoch(state, batches, val, slow)
            mgr.save(epoch + 1, state, metrics=metrics)
            print(
                f"COMMITTED {epoch + 1} {metrics['val_loss']:.5f} {metrics['val_acc']:.4f} {digest(state)}", flush=True
            )
    tk.save(model.state_dict(), out)


def _job(run: str, out: str, slow: float = 0.0) -> subprocess.Popen:
    # OpenMP and MKL read their thread settings as torch starts: set them in the child's environment
    return subprocess.Popen(
        [sys.executable, "-m", "tensorkeep.demo", "--train", run, out, "--slow", str(slow)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **determinism.PINNED_ENV},
    )


@dataclass
class Job:
    """What one training process reported: its settings, its state after a restore and after each epoch."""

    settings: dict[str, Any] = field(default_factory=dict)
    resumed: tuple[int, str] | None = None  # (epoch, digest of the restored state)
    epochs: dict[int, tuple[str, str]] = field(default_factory=dict)  # epoch -> (val_loss, digest)
    returncode: int | None = None


def _follow(p: subprocess.Popen, stop_after: int | None = None, quiet: bool = False) -> Job:
    assert p.stdout is not None
    job = Job()
    say = (lambda _: None) if quiet else print
    for line in p.stdout:
        kind, *rest = line.split(maxsplit=1 if line.startswith("SETTINGS") else -1)
        if kind == "SETTINGS":
            job.settings = json.loads(rest[0])
        elif kind == "RESUMED":
            job.resumed = (int(rest[0]), rest[1])
            say(f"  found checkpoint of epoch {rest[0]}: resuming from there (model, optimizer, scheduler, RNGs)")
        elif kind == "FRESH":
            say("  no checkpoint yet: starting from scratch")
        elif kind == "COMMITTED":
            job.epochs[int(rest[0])] = (rest[1], rest[3])
            say(
                f"  epoch {int(rest[0]):2d} done  val_loss {float(rest[1]):.4f}  val_acc {float(rest[2]):.1%}"
                f"  -> checkpoint committed"
            )
            if stop_after is not None and int(rest[0]) >= stop_after:
                time.sleep(0.05)
                os.kill(p.pid, signal.SIGKILL)
                job.returncode = p.wait()
                say(f"  *** SIGKILL: the training process died mid-epoch {stop_after + 1} (like a power cut) ***")
                return job
    job.returncode = p.wait()
    return job


def _first_difference(a: Job, b: Job, epochs: Any) -> int | None:
    return next((e for e in epochs if e in a.epochs and e in b.epochs and a.epochs[e][1] != b.epochs[e][1]), None)


def diagnose(first: Job, second: Job, reference: Job, rerun: Callable[[], Job]) -> tuple[int, str]:
    """Why the resumed run's final weights differ from the reference's: (exit code, message).

    Exit 3 when the arithmetic was not reproducible (not a resume problem), 1 when the resume
    was not exact. ``rerun`` runs the uninterrupted training again, only when nothing else decides.
    """
    not_resume = "; not a resume problem: resuming can only be exact where the same script computes the same way twice"
    e = _first_difference(first, reference, sorted(first.epochs))
    if e is not None:
        lines = determinism.differences(first.settings, reference.settings, ("first run", "reference"))
        return 3, (
            f"the arithmetic of this machine was not reproducible (two runs of the same script from the same "
            f"seed differed at epoch {e}, before any kill: val_loss {first.epochs[e][0]} vs "
            f"{reference.epochs[e][0]}{'; settings differed: ' + '; '.join(lines) if lines else ''})" + not_resume
        )
    lines = determinism.differences(second.settings, reference.settings, ("resumed run", "reference"))
    if lines:
        return (
            3,
            f"the resumed process computed differently from the uninterrupted one ({'; '.join(lines)})" + not_resume,
        )
    if second.resumed is None:
        return 1, "resume was not exact: the restarted run found no checkpoint to resume from"
    at, restored = second.resumed
    if at in reference.epochs and reference.epochs[at][1] != restored:
        return 1, (
            f"resume was not exact: the state restored from epoch {at}'s checkpoint differs from the "
            f"uninterrupted run's state after epoch {at}"
        )
    again = rerun()
    e = _first_difference(reference, again, range(1, EPOCHS + 1))
    if e is not None:
        return 3, (
            f"the arithmetic of this machine was not reproducible (the uninterrupted run, run twice, differed "
            f"at epoch {e}: val_loss {reference.epochs[e][0]} vs {again.epochs[e][0]})" + not_resume
        )
    e = _first_difference(second, reference, range(at + 1, EPOCHS + 1))
    if e is None:
        return 1, "the training states matched after every epoch, but the final weights saved differ"
    return 1, (
        f"resume was not exact: the state restored from epoch {at} was identical, but epoch {e} then differed "
        f"(something the checkpoint does not capture, e.g. a data loader's or another RNG's state)"
    )


_MARK = ".tensorkeep-demo"
_OWN = ("run", "reference-run", "reference-again", "resumed.tk", "reference.tk", "reference-again.tk")


def _fresh(d: str) -> None:
    """Make ``d`` ready for a demo: only what an earlier demo made there (it marks the directory)
    is removed; a directory the demo did not make is never touched."""
    mark = os.path.join(d, _MARK)
    if (
        os.path.lexists(d)
        and not (os.path.isfile(mark) and not os.path.islink(mark))
        and (not os.path.isdir(d) or os.listdir(d))
    ):
        sys.exit(f"{d} exists and was not made by the demo, so the demo leaves it alone: pass --dir NEW_DIR")
    os.makedirs(d, exist_ok=True)
    for n in _OWN:
        p = os.path.join(d, n)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)
    fd = os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)  # never through a symlink
    with os.fdopen(fd, "w") as f:
        f.write("made by python -m tensorkeep.demo; it replaces only its own files here\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="demo-run")
    ap.add_argument("--train", nargs=2, metavar=("RUN", "OUT"))
    ap.add_argument("--slow", type=float, default=0.0)
    ap.add_argument("--epochs", type=int, default=EPOCHS, help=argparse.SUPPRESS)  # with --train
    a = ap.parse_args()
    if a.train:
        run_dir, out = a.train
        return train(run_dir, out, slow=a.slow, epochs=a.epochs)
    t0 = time.time()
    _fresh(a.dir)
    run, ref_run = os.path.join(a.dir, "run"), os.path.join(a.dir, "reference-run")
    resumed, reference = os.path.join(a.dir, "resumed.tk"), os.path.join(a.dir, "reference.tk")

    print(f"1. Training an MLP on handwritten digits for {EPOCHS} epochs, a checkpoint after each epoch ...")
    first = _follow(_job(run, resumed, slow=0.004), stop_after=KILL_AFTER)
    print("\n2. Starting the very same script again:")
    second = _follow(_job(run, resumed))
    print("\n3. For comparison, a run that was never interrupted:")
    ref = _follow(_job(ref_run, reference))
    if second.returncode or ref.returncode:
        sys.exit(f"demo failed: a training process exited with {second.returncode or ref.returncode}")
    a_sd, b_sd = tk.load(resumed), tk.load(reference)
    same = a_sd.keys() == b_sd.keys() and all(
        torch.equal(
            a_sd[k].view(torch.uint8) if a_sd[k].is_floating_point() else a_sd[k],
            b_sd[k].view(torch.uint8) if b_sd[k].is_floating_point() else b_sd[k],
        )
        for k in a_sd
    )
    print(
        f"   final weights of the resumed run {'ARE' if same else 'are NOT'} bit-identical to the uninterrupted run's"
        f" ({len(a_sd)} tensors compared byte for byte)"
    )
    if not same:
        print("   finding out why (this may run the uninterrupted training once more) ...")
        again = os.path.join(a.dir, "reference-again")
        code, why = diagnose(first, second, ref, lambda: _follow(_job(again, again + ".tk"), quiet=True))
        print(f"   {why}")
        sys.exit(code)

    print("\n4. The checkpoints that retention kept (keep_last=3, plus the best val_loss):")
    with tk.CheckpointManager(run, keep_last=3, keep_best=("val_loss", "min")) as mgr:
        best, latest = mgr.best_step(), mgr.latest_step()
        assert best is not None  # every checkpoint of the demo records val_loss
        for s in mgr.steps():
            m = mgr.metrics(s)
            tags = ", ".join(t for t, ok in (("latest", s == latest), ("best", s == best)) if ok)
            print(f"   epoch {s:2d}  val_loss {m['val_loss']:.4f}  val_acc {m['val_acc']:.1%}  {tags}")
        model = DigitsMLP()
        opt = torch.optim.AdamW(model.parameters())
        earlier = min(mgr.steps())
        print(f"\n5. Rolling back to an earlier checkpoint (epoch {earlier}):")
        mgr.restore({"model": model, "optimizer": opt}, step=earlier)
        _, _, Xva, yva = data()
        print(
            f"   restored model's val_acc: {accuracy(model, Xva, yva):.1%} (as recorded: {mgr.metrics(earlier)['val_acc']:.1%})"
        )
        model_file = os.path.join(mgr.path(best), "model.tk")

    print(f"\n6. Reusing the first layer of the best checkpoint (epoch {best}) in a smaller model:")
    small = SmallNet()
    report = tk.load_into(small, model_file, include=["hidden1."], strict=False)
    print("   " + str(report).replace("\n", "\n   "))
    print(f"\nDone in {time.time() - t0:.0f} s. Look around: tensorkeep inspect {model_file}")


if __name__ == "__main__":
    main()
