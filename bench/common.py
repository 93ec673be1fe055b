"""Shared helpers for the benchmarks: the GPT-2-small workload, timing, page-cache eviction."""

from __future__ import annotations

import os
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable

import torch


def gpt2_state_dict(seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """A GPT-2-small-shaped fp32 state dict: 148 tensors, 497.8 MB."""
    g = torch.Generator().manual_seed(seed)
    d, n_ctx, vocab = 768, 1024, 50257
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    sd["wte.weight"] = r(vocab, d)
    sd["wpe.weight"] = r(n_ctx, d)
    for i in range(12):
        p = f"h.{i}."
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = r(d), r(d)
        sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"] = r(d, 3 * d), r(3 * d)
        sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"] = r(d, d), r(d)
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = r(d), r(d)
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = r(d, 4 * d), r(4 * d)
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = r(4 * d, d), r(d)
    sd["ln_f.weight"], sd["ln_f.bias"] = r(d), r(d)
    return sd


def nbytes(sd: dict) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def evict(path: str) -> None:
    """Drop a file from the page cache (after an fsync), for cold-read timings."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def prime(path: str) -> None:
    """Read a file once so that it is in the page cache, for warm-read timings (a file written with
    O_DIRECT, as tensorkeep writes large ones, is not cached by the write)."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        while f.readinto(buf):
            pass


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def summary(xs: list[float]) -> tuple[float, float]:
    return statistics.median(xs), min(xs)


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS and return it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak_rss() -> int:
    return _status("VmHWM")
