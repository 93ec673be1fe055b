"""Saves checkpoints in a loop until killed; each step's tensors are a function of the step.

python save_loop_job.py RUN_DIR [--keep-last N] [--mb SIZE] [--async-save] [--one-file]
"""

import argparse
import sys

import torch

import tensorkeep as tk


def expected(step: int, mb: float) -> dict:
    n = max(1, int(mb * 1e6 / 4 / 2))
    return {"a": torch.full((n,), float(step)), "b": torch.arange(n, dtype=torch.float32) + step}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--keep-last", type=int, default=2)
    ap.add_argument("--mb", type=float, default=8.0)
    ap.add_argument("--async-save", action="store_true")
    ap.add_argument("--one-file", action="store_true")
    a = ap.parse_args()
    with tk.CheckpointManager(a.run, keep_last=a.keep_last, async_save=a.async_save, one_file=a.one_file) as mgr:
        lin = torch.nn.Linear(4, 4)
        state = {"model": lin, "step": 0, "data": {}}
        step = mgr.restore(state) or 0
        while True:
            step += 1
            state["data"] = expected(step, a.mb)
            state["step"] = step
            with torch.no_grad():
                lin.weight.fill_(step)
            mgr.save(step, state, metrics={"step": step})
            sys.stdout.write(f"COMMITTED {step}\n")  # one write: a kill cannot cut the line (even unbuffered)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
