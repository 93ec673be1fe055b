"""Loading a checkpoint into a model: tk.load_into vs model.load_state_dict(torch.load(...)).

    .venv/bin/python bench/bench_load_into.py [--reps 5]

Each measurement runs in a fresh subprocess: build the GPT-2-small-shaped model, reset the
kernel's peak-RSS mark, load, report time and peak RSS above the model's own memory.
Contenders alternate (A B A B ...); medians and minimums.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import gpt2_state_dict, nbytes, peak_rss, reset_peak_rss, table

import tensorkeep as tk


class Holder(nn.Module):
    """A module with exactly the state dict's parameters (GPT-2-small shapes)."""

    def __init__(self, shapes: dict) -> None:
        super().__init__()
        self.params = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(torch.zeros(s)) for k, s in shapes.items()})

    def load_names(self, sd: dict) -> dict:
        return {"params." + k.replace(".", "__"): v for k, v in sd.items()}


def child(kind: str, path: str) -> None:
    with tk.open(path.replace(".pt", ".tk")) as f:
        shapes = {n: f.info(n).shape for n in f}
    model = Holder(shapes)
    base = reset_peak_rss()
    t = time.perf_counter()
    if kind == "tk":
        tk.load_into(model, path, rename=lambda n: "params." + n.replace(".", "__"))
    else:
        model.load_state_dict(model.load_names(torch.load(path, weights_only=True)))
    dt = time.perf_counter() - t
    print(json.dumps({"s": dt, "extra_mb": (peak_rss() - base) / 1e6}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/tk-bench")
    ap.add_argument("--child", nargs=2)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    os.makedirs(a.dir, exist_ok=True)
    sd = gpt2_state_dict()
    mb = nbytes(sd) / 1e6
    tkp, ptp = os.path.join(a.dir, "gpt2.tk"), os.path.join(a.dir, "gpt2.pt")
    tk.save(sd, tkp)
    torch.save(sd, ptp)
    del sd
    res: dict[str, list] = {"tk.load_into": [], "load_state_dict(torch.load)": []}
    for _ in range(a.reps):
        for name, kind, p in (("tk.load_into", "tk", tkp), ("load_state_dict(torch.load)", "pt", ptp)):
            out = subprocess.run(
                [sys.executable, __file__, "--child", kind, p], check=True, capture_output=True, text=True
            ).stdout
            res[name].append(json.loads(out.strip().splitlines()[-1]))
    print(f"workload: GPT-2-small-shaped fp32 checkpoint, {mb:.1f} MB, page cache warm, {a.reps} alternating reps\n")
    rows = []
    for name, xs in res.items():
        ts, mem = [x["s"] for x in xs], [x["extra_mb"] for x in xs]
        rows.append(
            (
                name,
                f"{statistics.median(ts) * 1e3:.0f}",
                f"{min(ts) * 1e3:.0f}",
                f"{statistics.median(mem):.0f}",
                f"{100 * statistics.median(mem) / mb:.1f}%",
            )
        )
    print(table(rows, ("operation", "median ms", "min ms", "peak extra RSS MB", "of checkpoint")))
    for p in (tkp, ptp):
        os.unlink(p)


if __name__ == "__main__":
    main()
