"""The CUDA path of asynchronous checkpoints, measured once on a machine with a GPU.

    .venv/bin/python bench/bench_gpu.py [--gb 2] [--reps 5] [--dir /tmp/tk-bench-gpu]

(a) Link: device-to-host copy bandwidth into pinned memory (one big copy, the limit) and into
    pageable memory, and the bandwidth the snapshot achieves over the model's tensors.
(b) Stall: a ~2 GB model on the GPU in a CheckpointManager: the time ``save()`` blocks the
    Python thread with ``async_save=True`` (copies queued on a side stream), the time until the
    GPU has the snapshot (the next kernel can run), and a synchronous save of the same state.
(c) Training: step time of a matmul loop with no checkpoint vs an async checkpoint issued
    before the step (the step's kernels queue behind the copies).
Prints one table; exits with a message where CUDA is missing.
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
from common import table

import tensorkeep as tk


def sync_time(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def d2h(nbytes: int, dev: torch.device, reps: int) -> tuple[float, float]:
    big = torch.empty(nbytes // 4, device=dev)
    pinned = torch.empty(nbytes // 4, pin_memory=True)
    pageable = torch.zeros(nbytes // 4)
    link = min(sync_time(lambda: pinned.copy_(big, non_blocking=True)) for _ in range(reps))
    pag = min(sync_time(lambda: pageable.copy_(big)) for _ in range(reps))
    return link, pag


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/tk-bench-gpu")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device")
    dev = torch.device("cuda:0")
    n_layers = 16
    width = int((a.gb * 1e9 / 4 / n_layers) ** 0.5)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(n_layers)]).to(dev)
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    gb = nbytes / 1e9
    rows = []

    link, pag = d2h(nbytes, dev, a.reps)
    rows.append(("D2H one copy into pinned memory (link limit)", f"{link * 1e3:.1f}", f"{gb / link:.1f} GB/s"))
    rows.append(("D2H one copy into pageable memory", f"{pag * 1e3:.1f}", f"{gb / pag:.1f} GB/s"))

    shutil.rmtree(a.dir, ignore_errors=True)
    sync_mgr = tk.CheckpointManager(os.path.join(a.dir, "sync"), keep_last=1)
    async_mgr = tk.CheckpointManager(os.path.join(a.dir, "async"), keep_last=1, async_save=True)
    async_mgr.save(0, {"model": model})  # allocates the pinned staging buffers once
    async_mgr.wait()
    blocks, landed, syncs = [], [], []
    for step in range(1, a.reps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        async_mgr.save(step, {"model": model})
        blocks.append(time.perf_counter() - t)
        torch.cuda.synchronize()  # the default stream waits for the side-stream copies
        landed.append(time.perf_counter() - t)
        async_mgr.wait()
        syncs.append(sync_time(lambda: sync_mgr.save(step, {"model": model})))
    med = statistics.median
    rows.append((f"sync save of {gb:.2f} GB (GPU to disk)", f"{med(syncs) * 1e3:.0f}", "100%"))
    rows.append(
        (
            "async save(): blocks the Python thread",
            f"{med(blocks) * 1e3:.1f}",
            f"{100 * med(blocks) / med(syncs):.1f}% of sync",
        )
    )
    rows.append(
        (
            "async save(): until the GPU has the snapshot",
            f"{med(landed) * 1e3:.1f}",
            f"{100 * med(landed) / med(syncs):.1f}% of sync; {gb / med(landed):.1f} GB/s",
        )
    )

    x = torch.randn(4096, width, device=dev)

    def train_step() -> None:
        y = x
        for layer in model:
            y = layer(y)
        y.sum().backward()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(1e-6 * p.grad)
                p.grad = None

    plain = med([sync_time(train_step) for _ in range(a.reps)])
    with_ckpt = []
    for step in range(a.reps):
        async_mgr.wait()
        with_ckpt.append(sync_time(lambda: (async_mgr.save(100 + step, {"model": model}), train_step())))
    async_mgr.close()
    sync_mgr.close()
    rows.append(("training step, no checkpoint", f"{plain * 1e3:.1f}", ""))
    rows.append(
        (
            "training step + async checkpoint before it",
            f"{med(with_ckpt) * 1e3:.1f}",
            f"+{100 * (med(with_ckpt) / plain - 1):.0f}%",
        )
    )
    shutil.rmtree(a.dir, ignore_errors=True)
    print(
        f"\n{torch.cuda.get_device_name(0)}, model {gb:.2f} GB fp32 ({n_layers} x {width}^2), torch {torch.__version__}"
    )
    print(table(rows, ("measure", "ms", "rate / share")))


if __name__ == "__main__":
    main()
