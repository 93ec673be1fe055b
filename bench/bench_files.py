"""Single-file save / load / open: tensorkeep vs torch.save/torch.load vs safetensors, same run.

    .venv/bin/python bench/bench_files.py [--reps 5] [--dir /tmp/tk-bench]

Contenders run interleaved (A B C A B C ...), a new file each time; medians and minimums.
Save times include fsync (durability); tensorkeep's includes the rename and directory fsync.
Cold loads evict the file from the page cache first. Peak extra RSS is measured in a fresh
subprocess per contender: ru_maxrss after the operation minus RSS once the state exists.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from common import evict, fsync_path, gpt2_state_dict, nbytes, peak_rss, prime, reset_peak_rss, summary, table, timed

import tensorkeep as tk
from tensorkeep.core.crc import crc32
from tensorkeep.file import headers
from tensorkeep.file.reader import open_reader

ONE = "h.5.mlp.c_fc.weight"


def save_tk(sd, p):
    tk.save(sd, p)


def save_torch(sd, p):
    torch.save(sd, p)
    fsync_path(p)


def save_st(sd, p):
    save_file(sd, p)
    fsync_path(p)


def load_tk(p):
    return tk.load(p)


def load_torch(p):
    return torch.load(p, weights_only=True)


def load_st(p):
    # safetensors' load_file maps the file lazily; touch every tensor so it is really read
    sd = load_file(p)
    for t in sd.values():
        t.sum()
    return sd


def load_tk_lazy(p):
    return tk.load(p, lazy=True, verify=False)


def get_tk(p):
    with tk.open(p) as f:
        return f.get(ONE)


def get_st(p):
    with safe_open(p, "pt") as f:
        return f.get_tensor(ONE)


def get_tk_lazy(p, verify=True, touch=False):
    with tk.open(p) as f:
        t = f.get(ONE, lazy=True, verify=verify)
    if touch:
        t.sum()
    return t


def get_st_touch(p):
    t = get_st(p)
    t.sum()  # its bytes are read only now, through the mapping
    return t


SAVES = {"tensorkeep save": save_tk, "torch.save + fsync": save_torch, "safetensors save_file + fsync": save_st}
EXT = {"tensorkeep save": ".tk", "torch.save + fsync": ".pt", "safetensors save_file + fsync": ".safetensors"}
LOADS = {
    "tensorkeep load (verified)": (load_tk, ".tk"),
    "torch.load(weights_only=True)": (load_torch, ".pt"),
    "safetensors load_file (+touch)": (load_st, ".safetensors"),
    "tensorkeep load lazy=True": (load_tk_lazy, ".tk"),
}
GETS = {
    "tensorkeep open().get(1 tensor)": (get_tk, ".tk"),
    "safetensors safe_open().get_tensor": (get_st, ".safetensors"),
}


MORE_GETS_TOUCH = "safetensors get_tensor + .sum() (reads every page)"


def open_tk(p, cached=True):
    open_reader(p, cached=cached).close()


def open_st(p):
    with safe_open(p, "pt") as f:
        f.keys()


class Floor:
    """The least work a verified read of one tensor into memory needs: ``preadv`` of its bytes into
    memory touched before, and their CRC-32, in 256 KiB pieces on 2 threads, nothing else."""

    def __init__(self, p):
        with tk.open(p) as f:
            self.start, self.n = f._r.header.data_start + f.info(ONE).begin, f.info(ONE).nbytes
        self.buf = np.zeros(self.n, np.uint8)
        self.fd = os.open(p, os.O_RDONLY)
        self.pool = ThreadPoolExecutor(2)

    def half(self, lo, hi):
        mv = memoryview(self.buf)
        for at in range(lo, hi, 256 << 10):
            part = mv[at : min(at + (256 << 10), hi)]
            os.preadv(self.fd, [part], self.start + at)
            crc32(part)

    def __call__(self, p):
        h = self.n // 2
        for f in [self.pool.submit(self.half, 0, h), self.pool.submit(self.half, h, self.n)]:
            f.result()


MORE_GETS = {
    "tensorkeep get(lazy=True) (verified: reads every page)": (get_tk_lazy, ".tk"),
    "safetensors get_tensor + .sum() (reads every page)": (get_st_touch, ".safetensors"),
    "tensorkeep get(lazy=True, verify=False) + .sum()": (lambda p: get_tk_lazy(p, False, True), ".tk"),
    "tensorkeep get(lazy=True, verify=False) (reads nothing)": (lambda p: get_tk_lazy(p, False), ".tk"),
}


def rss_child(what: str, name: str, path: str) -> None:
    """Run in a subprocess: print peak extra RSS (MB) of one operation."""
    if what == "save":
        sd = gpt2_state_dict()
        base = reset_peak_rss()
        SAVES[name](sd, path)
    else:
        SAVES[
            {".tk": "tensorkeep save", ".pt": "torch.save + fsync", ".safetensors": "safetensors save_file + fsync"}[
                os.path.splitext(path)[1]
            ]
        ](gpt2_state_dict(), path)
        import gc

        gc.collect()
        base = reset_peak_rss()
        out = LOADS[name][0](path)
        if name.startswith("safetensors"):
            del out
    print(json.dumps({"extra_mb": (peak_rss() - base) / 1e6}))


def measure_rss(what: str, name: str, path: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", what, name, path], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_mb"]


def gets(a: argparse.Namespace) -> None:
    """One 9.4 MB tensor out of the 498 MB file (warm page cache), every way, interleaved."""
    sd = gpt2_state_dict()
    paths = {".tk": os.path.join(a.dir, "g.tk"), ".safetensors": os.path.join(a.dir, "g.safetensors")}
    save_tk(sd, paths[".tk"])
    save_st(sd, paths[".safetensors"])
    del sd
    floor = Floor(paths[".tk"])
    every = {
        **GETS,
        **MORE_GETS,
        "floor: preadv + CRC-32 into touched memory, 2 threads": (floor, ".tk"),
        "tensorkeep open() alone, header parsed": (lambda p: open_tk(p, cached=False), ".tk"),
        "tensorkeep open() alone, header cached": (open_tk, ".tk"),
        "safetensors safe_open() alone": (open_st, ".safetensors"),
    }
    time.sleep(headers.SETTLE_SECONDS)  # a file written this second is not cached: as for any file read later
    times: dict[str, list[float]] = {k: [] for k in every}
    for _ in range(a.gets):
        for name, (fn, ext) in every.items():
            times[name].append(timed(lambda: fn(paths[ext])))
    st, touched = (summary(times[k]) for k in ("safetensors safe_open().get_tensor", MORE_GETS_TOUCH))
    rows = [
        (
            name,
            f"{summary(xs)[0] * 1e3:.2f}",
            f"{summary(xs)[1] * 1e3:.2f}",
            f"{summary(xs)[0] / st[0]:.1f}x",
            f"{summary(xs)[0] / touched[0]:.2f}x / {summary(xs)[1] / touched[1]:.2f}x",
        )
        for name, xs in times.items()
    ]
    head = (
        "one tensor (9.4 MB) of the 498 MB file",
        "median ms",
        "min ms",
        "of get_tensor",
        "of get_tensor + .sum() (med/min)",
    )
    print(table(rows, head))
    for p in paths.values():
        os.unlink(p)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/tk-bench")
    ap.add_argument("--rss-child", nargs=3)
    ap.add_argument("--gets", type=int, metavar="REPS", help="only the one-tensor reads, REPS interleaved rounds")
    a = ap.parse_args()
    if a.rss_child:
        return rss_child(*a.rss_child)
    os.makedirs(a.dir, exist_ok=True)
    if a.gets:
        return gets(a)
    sd = gpt2_state_dict()
    mb = nbytes(sd) / 1e6
    print(
        f"workload: GPT-2-small-shaped fp32 state dict, {len(sd)} tensors, {mb:.1f} MB; "
        f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores, {a.reps} interleaved reps\n"
    )
    times: dict[str, list[float]] = {k: [] for k in [*SAVES, *LOADS, *[k + " (cold)" for k in LOADS], *GETS]}
    for rep in range(a.reps):
        paths = {}
        for name, fn in SAVES.items():
            p = os.path.join(a.dir, f"r{rep}{EXT[name]}")
            times[name].append(timed(lambda: fn(sd, p)))
            paths[EXT[name]] = p
        for name, (fn, ext) in LOADS.items():
            prime(paths[ext])  # warm: every contender's file in the page cache, however it was written
            times[name].append(timed(lambda: fn(paths[ext])))
        for name, (fn, ext) in GETS.items():
            times[name].append(timed(lambda: fn(paths[ext])))
        for name, (fn, ext) in LOADS.items():
            evict(paths[ext])
            times[name + " (cold)"].append(timed(lambda: fn(paths[ext])))
        if rep:
            for p in paths.values():
                os.unlink(p)
    rows = []
    for name, xs in times.items():
        med, lo = summary(xs)
        thr = f"{mb / med / 1e3:.2f}" if "get" not in name else "-"
        rows.append((name, f"{med * 1e3:.1f}", f"{lo * 1e3:.1f}", thr))
    print(table(rows, ("operation", "median ms", "min ms", "GB/s (median)")))
    print()
    rss_rows = []
    for name in SAVES:
        rss_rows.append((name, f"{measure_rss('save', name, os.path.join(a.dir, 'rss' + EXT[name])):.0f}"))
    for name, (_fn, ext) in LOADS.items():
        rss_rows.append((name, f"{measure_rss('load', name, os.path.join(a.dir, 'rss' + ext)):.0f}"))
    print(table(rss_rows, ("operation", "peak extra RSS MB")))
    for f in os.listdir(a.dir):
        os.unlink(os.path.join(a.dir, f))


if __name__ == "__main__":
    main()
