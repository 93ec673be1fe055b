"""Where the time of a save and a load goes, next to what this machine can do at each stage.

    .venv/bin/python bench/bench_stages.py [--reps 5] [--dir /tmp/tk-bench-stages]

GPT-2-small-shaped fp32 state (497.8 MB). Each stage of tensorkeep's pipeline is timed alone,
and beside it the raw limit of the same work on this machine (plain memory copy, plain
pwrite into the page cache, O_DIRECT write + fsync, O_DIRECT read). Thread counts are the
library's (knobs.IO_THREADS) unless a row says otherwise. Minimum of ``--reps`` runs.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import evict, gpt2_state_dict, nbytes, table

import tensorkeep as tk
from tensorkeep import knobs
from tensorkeep.checkpoint import packs
from tensorkeep.checkpoint.snapshot import Staging
from tensorkeep.core.format import crc32

CHUNK = 8 << 20


def best(fn: Callable[[], object], reps: int, before: Callable[[], object] = lambda: None) -> float:
    ts = []
    for _ in range(reps):
        before()
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def raw_write(path: str, arrays: list[np.ndarray], direct: bool, sync: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    buf = mmap.mmap(-1, CHUNK) if direct else None
    try:
        off = 0
        for a in arrays:
            mv = memoryview(a)
            for i in range(0, len(mv), CHUNK):
                piece = mv[i : i + CHUNK]
                if direct:  # the disk alone: the aligned buffer is written as it is, no copy
                    n = -(-len(piece) // 4096) * 4096
                    os.pwrite(fd, memoryview(buf)[:n], off)  # type: ignore[arg-type]
                else:
                    os.pwrite(fd, piece, off)
                off += -(-len(piece) // 4096) * 4096 if direct else len(piece)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
        if buf is not None:
            buf.close()


def raw_read_direct(path: str, size: int, threads: int, direct: bool = True) -> None:
    """Read a file into reused buffers on ``threads`` threads: the disk's limit (buffered, with the
    kernel's readahead, when not ``direct``)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    bufs = [mmap.mmap(-1, CHUNK) for _ in range(threads)]
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: os.preadv(fd, [bufs[i % threads]], i * CHUNK), range(-(-size // CHUNK))))
    finally:
        os.close(fd)
        for b in bufs:
            b.close()


def raw_read_fresh(path: str, size: int, threads: int) -> mmap.mmap:
    """Read a file with O_DIRECT into new page-aligned memory, CRC-32 per 4 MiB block, on ``threads``
    threads, no Python per tensor: the floor of any load that returns new memory (its page faults)."""
    fd, n = os.open(path, os.O_RDONLY | os.O_DIRECT), -(-size // 4096) * 4096
    out = mmap.mmap(-1, n)
    mv = memoryview(out)

    def task(i: int) -> None:
        a, b = i * CHUNK, min(n, (i + 1) * CHUNK)
        os.preadv(fd, [mv[a:b]], a)
        for k in range(a, b, 4 << 20):
            crc32(mv[k : min(b, k + (4 << 20))])

    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(task, range(-(-n // CHUNK))))
    finally:
        os.close(fd)
        mv.release()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/tk-bench-stages")
    a = ap.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    os.makedirs(a.dir)
    sd = gpt2_state_dict()
    size = nbytes(sd)
    arrays = [t.view(-1).view(torch.uint8).numpy() for t in sd.values()]
    mb = size / 1e6
    rows = []

    def row(stage: str, secs: float, limit_name: str = "", limit_secs: float | None = None, of_mb: float = mb) -> None:
        gbs = of_mb / 1e3 / secs
        lim = f"{of_mb / 1e3 / limit_secs:.1f} GB/s {limit_name}" if limit_secs else ""
        pct = f"{100 * limit_secs / secs:.0f}%" if limit_secs else ""
        rows.append((stage, f"{secs * 1e3:.0f}", f"{gbs:.1f}", lim, pct))

    # memory: the snapshot of an async save
    dst = {k: torch.empty_like(v) for k, v in sd.items()}
    copy = best(lambda: [dst[k].copy_(v) for k, v in sd.items()], a.reps)
    st = Staging()
    st.snapshot(dict(sd))
    row(
        "snapshot into reused staging (async save blocks)",
        best(lambda: st.snapshot(dict(sd)), a.reps),
        "copy_ into touched memory",
        copy,
    )

    # checksums and content hashes
    with ThreadPoolExecutor(knobs.IO_THREADS) as pool:
        crc1 = best(lambda: [crc32(memoryview(x)) for x in arrays], a.reps)
        crc2 = best(lambda: list(pool.map(lambda x: crc32(memoryview(x)), arrays)), a.reps)
        row("CRC-32 per 4 MiB block, 1 thread (ISA-L)", crc1)
        row(f"CRC-32, {knobs.IO_THREADS} threads", crc2, "1 thread x threads", crc1 / knobs.IO_THREADS)
        sha = best(lambda: [d() for d in [packs.content_hash("U8", x.shape, x, pool) for x in arrays]], a.reps)
        sha1 = best(lambda: [hashlib.sha256(x).digest() for x in arrays], a.reps)
        row("SHA-256, 1 thread", sha1)
        row(
            f"SHA-256 content hash (incremental), {knobs.IO_THREADS} threads",
            sha,
            "1 thread x threads",
            sha1 / knobs.IO_THREADS,
        )

    # writing
    p = os.path.join(a.dir, "raw.bin")
    cache = best(lambda: raw_write(p, arrays, False, False), a.reps, lambda: os.path.exists(p) and os.unlink(p))
    disk = best(lambda: raw_write(p, arrays, True, True), a.reps, lambda: os.path.exists(p) and os.unlink(p))
    t_fsync = []
    for _ in range(a.reps):
        raw_write(p, arrays, False, False)
        fd = os.open(p, os.O_RDONLY)
        t = time.perf_counter()
        os.fsync(fd)
        t_fsync.append(time.perf_counter() - t)
        os.close(fd)
    row("raw pwrite into the page cache (no fsync)", cache)
    row("raw fsync of those dirty pages", min(t_fsync))
    row("raw O_DIRECT write + fsync (disk limit)", disk)
    out = os.path.join(a.dir, "model.tk")
    gone = lambda: os.path.exists(out) and os.unlink(out)
    row(
        "tk.save(durable=False), buffered path forced",
        best(lambda: _save(sd, out, durable=False, direct=False), a.reps, gone),
        "raw pwrite to page cache",
        cache,
    )
    row(
        "tk.save (O_DIRECT + CRC overlapped, fsync)",
        best(lambda: tk.save(sd, out), a.reps, gone),
        "raw O_DIRECT + fsync",
        disk,
    )
    with tk.CheckpointManager(os.path.join(a.dir, "run"), keep_last=1) as mgr:
        step = iter(range(10**6))
        row(
            "CheckpointManager.save (sync)",
            best(lambda: mgr.save(next(step), {"model": sd}), a.reps),
            "raw O_DIRECT + fsync",
            disk,
        )

    # reading
    tk.save(sd, out)
    cold_direct = best(lambda: raw_read_direct(out, size, knobs.IO_THREADS), a.reps, lambda: evict(out))
    cold_buffered = best(lambda: raw_read_direct(out, size, knobs.IO_THREADS, False), a.reps, lambda: evict(out))
    row(f"raw O_DIRECT read, {knobs.IO_THREADS} threads", cold_direct)
    row(f"raw buffered read, {knobs.IO_THREADS} threads", cold_buffered)
    fresh = best(lambda: raw_read_fresh(out, size, knobs.IO_THREADS).close(), a.reps, lambda: evict(out))
    row("raw O_DIRECT read + CRC into new memory", fresh, "disk (faster raw read)", min(cold_direct, cold_buffered))
    cold_raw = min(cold_direct, cold_buffered)
    row(
        "tk.load, cold (read + verify, threads)",
        best(lambda: tk.load(out), a.reps, lambda: evict(out)),
        "disk (faster raw read)",
        cold_raw,
    )
    warm_copy = best(lambda: [np.copyto(np.empty_like(x), x) for x in arrays], a.reps)
    row("tk.load, warm (page cache)", best(lambda: tk.load(out), a.reps), "copy into fresh memory", warm_copy)
    restore_rows(a, row)
    shutil.rmtree(a.dir, ignore_errors=True)
    print(
        f"\n{mb:.1f} MB, IO_THREADS={knobs.IO_THREADS}, {os.cpu_count()} cores, torch threads={torch.get_num_threads()}"
    )
    print(table(rows, ("stage", "ms", "GB/s", "machine limit", "of limit")))


def model_and_adamw(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The GPT-2-small-shaped parameters in a module, and AdamW with its state (3x the model)."""
    m = torch.nn.Module()
    for name, t in gpt2_state_dict(seed).items():
        m.register_parameter(name.replace(".", "_"), torch.nn.Parameter(t))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    for p in m.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    return m, opt


def restore_rows(a: argparse.Namespace, row: Callable[..., None]) -> None:
    """CheckpointManager.restore of model + AdamW into a live model and optimizer, cold and warm."""
    run = os.path.join(a.dir, "restore-run")
    m, opt = model_and_adamw(1)
    with tk.CheckpointManager(run, keep_last=1) as mgr:
        mgr.save(1, {"model": m, "opt": opt})
    files = [os.path.join(dp, f) for dp, _, fs in os.walk(run) for f in fs if not f.startswith(".")]
    total = sum(os.path.getsize(f) for f in files)
    live_m, live_opt = model_and_adamw(2)  # what a resumed process has built before it restores
    state = {"model": live_m, "opt": live_opt}
    evict_all = lambda: [evict(f) for f in files]

    def raw_cold(direct: bool) -> None:
        for f in files:
            raw_read_direct(f, os.path.getsize(f), knobs.IO_THREADS, direct)

    with tk.CheckpointManager(run, keep_last=1) as mgr:
        cold = best(lambda: mgr.restore(state), a.reps, evict_all)
        warm = best(lambda: mgr.restore(state), a.reps)
    assert all(torch.equal(x, y) for x, y in zip(live_m.parameters(), m.parameters()))
    cold_raw = min(best(lambda: raw_cold(True), a.reps, evict_all), best(lambda: raw_cold(False), a.reps, evict_all))
    srcs = [t for t in [*m.parameters(), *(v for s in opt.state.values() for v in s.values())] if t.dim()]
    dsts = [torch.empty_like(t).fill_(0) for t in srcs]
    touched = best(lambda: [d.copy_(s) for d, s in zip(dsts, srcs)], a.reps)
    mb = total / 1e6
    row(f"restore model+AdamW ({mb / 1e3:.2f} GB), cold", cold, "disk (faster raw read)", cold_raw, of_mb=mb)
    row(f"restore model+AdamW ({mb / 1e3:.2f} GB), warm", warm, "copy_ into touched memory", touched, of_mb=mb)


def _save(sd: dict, out: str, durable: bool, direct: bool) -> None:
    old = knobs.DIRECT_IO_MIN_BYTES
    knobs.DIRECT_IO_MIN_BYTES = old if direct else 1 << 62
    try:
        tk.save(sd, out, durable=durable)
    finally:
        knobs.DIRECT_IO_MIN_BYTES = old


if __name__ == "__main__":
    main()
