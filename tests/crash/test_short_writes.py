"""Saves under real short writes and I/O errors, injected at the os level.

Every ``os.pwrite`` tensorkeep makes (all of its writes go through ``_io.pwrite_all``) is wrapped so
that it really writes only part of its buffer to the file, or fails with EIO; ``os.fsync`` fails
with EIO. The file must come out complete and byte-identical to an undisturbed save, or the save
must raise SaveError with the previous file byte-identical, no temp file left and the failed fsync
not retried. (tests/crash/test_durability.py covers ENOSPC, EFBIG and failed fsyncs at the _io level.)

On an O_DIRECT descriptor a short write that stops mid-block leaves the rest unaligned, which the
kernel refuses (EINVAL): the wrapper lets the kernel answer such requests itself.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import pytest
import torch

import tensorkeep as tk
from tensorkeep import knobs
from tensorkeep.storage import local as _io

REAL_PWRITE = os.pwrite


def small_obj() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(33, 17, generator=g),
        "n": np.arange(11, dtype=np.int16),
        "e": torch.zeros(0, 3),
        "s": torch.tensor(2.5, dtype=torch.float64),
        "step": 7,
        "l": [1, "x", None],
    }


def large_obj() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "big": torch.randn(50_000, generator=g),
        "odd": torch.arange(8193, dtype=torch.int16),
        "n": np.linspace(0, 1, 999),
        "small": small_obj(),
    }


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return type(b) is np.ndarray and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def temps(d: str) -> list[str]:
    return [n for n in os.listdir(d) if _io.TMP_MARK in n]


@contextmanager
def page_cache(fd: int) -> Iterator[None]:
    """Clear O_DIRECT for one call: the kernel would refuse to write an unaligned piece direct,
    though a real direct write interrupted by a quota or a signal can stop anywhere."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
    try:
        yield
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


class ShortWrites:
    """``os.pwrite`` that writes (for real) only part of each buffer: ``one`` byte, ``half`` (rounded
    down to 4 KiB on an O_DIRECT descriptor, as a device would) or ``mid-block`` (just under half:
    on an O_DIRECT descriptor, a write cut short by a quota or a signal can end anywhere)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.calls: list[tuple[int, int, bool]] = []  # (asked, written, O_DIRECT)

    def __call__(self, fd: int, buf, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        direct = _io.fd_is_direct(fd)
        if direct and (offset % knobs.ALIGN or len(mv) % knobs.ALIGN):
            n = REAL_PWRITE(fd, mv, offset)  # unaligned O_DIRECT: the kernel's own answer is EINVAL
        elif self.mode == "one" or len(mv) == 1:
            with page_cache(fd) if direct else nullcontext():
                n = REAL_PWRITE(fd, mv[:1], offset)
        else:
            k = len(mv) // 2 if self.mode == "half" else max(1, len(mv) // 2 - 1)
            if direct and self.mode == "half":
                k = max(knobs.ALIGN, k - k % knobs.ALIGN)
            with page_cache(fd) if direct and k % knobs.ALIGN else nullcontext():
                n = REAL_PWRITE(fd, mv[:k], offset)
        self.calls.append((len(mv), n, direct))
        return n


@pytest.fixture(params=["small", "medium", "large"])
def size(request, monkeypatch):
    """small: one buffered write of the whole file; medium: buffered writes per tensor;
    large: O_DIRECT through 64 KiB staging buffers (knobs shrunk)."""
    if request.param == "medium":
        monkeypatch.setattr(knobs, "ONE_WRITE_BYTES", 0)
    if request.param == "large":
        monkeypatch.setattr(knobs, "DIRECT_IO_MIN_BYTES", 64 << 10)
        monkeypatch.setattr(knobs, "CHUNK_BYTES", 64 << 10)
        monkeypatch.setattr(knobs, "BLOCK_BYTES", 10_000)
        return large_obj
    return small_obj


@pytest.mark.parametrize("mode", ["one", "half", "mid-block"])
def test_save_survives_short_writes(tmp, monkeypatch, size, mode):
    obj = size()
    ref = os.path.join(tmp, "reference.tk")
    tk.save(obj, ref)
    p = os.path.join(tmp, "x.tk")
    short = ShortWrites(mode)
    monkeypatch.setattr(os, "pwrite", short)
    tk.save(obj, p)
    monkeypatch.setattr(os, "pwrite", REAL_PWRITE)
    assert any(written < asked for asked, written, _ in short.calls)
    assert any(direct for _, _, direct in short.calls) == (size is large_obj)  # the O_DIRECT path was taken
    assert open(p, "rb").read() == open(ref, "rb").read()
    assert same(tk.load(p), obj) and same(tk.load(p, lazy=True), obj)
    assert temps(tmp) == []


def test_checkpoint_save_survives_short_writes(tmp, monkeypatch):
    net = torch.nn.Linear(8, 4)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 8)).sum().backward()
    opt.step()
    state = {"model": net, "optimizer": opt, "extra": {"t": torch.arange(5), "step": 3}}
    short = ShortWrites("half")
    monkeypatch.setattr(os, "pwrite", short)
    with tk.CheckpointManager(tmp) as mgr:
        mgr.save(1, state)
    monkeypatch.setattr(os, "pwrite", REAL_PWRITE)
    assert any(written < asked for asked, written, _ in short.calls)
    net2 = torch.nn.Linear(8, 4)
    opt2 = torch.optim.Adam(net2.parameters())
    restored = {"model": net2, "optimizer": opt2, "extra": {}}
    with tk.CheckpointManager(tmp) as mgr:
        assert mgr.restore(restored) == 1
    assert same(net2.state_dict(), net.state_dict()) and same(opt2.state_dict()["state"], opt.state_dict()["state"])
    assert same(restored["extra"], state["extra"]) and temps(tmp) == []


# ----------------------------------------------------------------------------- EIO


def eio(*_a) -> None:
    raise OSError(errno.EIO, "Input/output error")


def test_eio_from_write_after_a_short_write(tmp, monkeypatch, size):
    """Every write call in turn fails with EIO, after the previous one was short: SaveError, old file intact."""
    p = os.path.join(tmp, "x.tk")
    tk.save(small_obj(), p)
    before = open(p, "rb").read()
    probe = ShortWrites("half")
    monkeypatch.setattr(os, "pwrite", probe)
    tk.save(size(), os.path.join(tmp, "probe.tk"))
    os.unlink(os.path.join(tmp, "probe.tk"))
    total = len(probe.calls)
    for fail_at in sorted({0, 1, total // 3, total // 2, total - 2, total - 1}):
        short = ShortWrites("half")
        monkeypatch.setattr(
            os, "pwrite", lambda fd, buf, off: eio() if len(short.calls) == fail_at else short(fd, buf, off)
        )
        with pytest.raises(tk.SaveError) as e:
            tk.save(size(), p)
        assert e.value.errno == errno.EIO and "EIO" in str(e.value) and "untouched" in str(e.value)
        assert open(p, "rb").read() == before, fail_at
        assert temps(tmp) == [], fail_at
    monkeypatch.setattr(os, "pwrite", REAL_PWRITE)
    assert same(tk.load(p), small_obj())


def first_fsync_fails(targets: list[str]):
    """An ``os.fsync`` that records the path of each file it is called on and fails the first with EIO."""
    real = os.fsync

    def fsync(fd: int) -> None:
        targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        if len(targets) == 1:
            eio()
        real(fd)

    return fsync


def test_eio_from_fsync_is_fatal_and_not_retried(tmp, monkeypatch, size):
    p = os.path.join(tmp, "x.tk")
    tk.save(small_obj(), p)
    before = open(p, "rb").read()
    targets: list[str] = []
    fsync = first_fsync_fails(targets)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(tk.SaveError) as e:
        tk.save(size(), p)
    assert e.value.errno == errno.EIO and "fsync of the file" in str(e.value) and "untouched" in str(e.value)
    assert len(targets) == 1 and _io.TMP_MARK in targets[0]  # the temp file's fsync, never retried, no directory fsync
    assert open(p, "rb").read() == before and temps(tmp) == []


def test_eio_from_fsync_in_a_checkpoint_save(tmp, monkeypatch):
    with tk.CheckpointManager(tmp) as mgr:
        mgr.save(1, {"w": torch.ones(3), "step": 1})
    before = {
        n: open(os.path.join(tmp, "step_00000001", n), "rb").read()
        for n in os.listdir(os.path.join(tmp, "step_00000001"))
    }
    targets: list[str] = []
    fsync, real = first_fsync_fails(targets), os.fsync

    with tk.CheckpointManager(tmp) as mgr:  # opened first: taking the run lock fsyncs too
        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(tk.SaveError) as e:
            mgr.save(2, {"w": torch.zeros(3), "step": 2})
        monkeypatch.setattr(os, "fsync", real)
        assert e.value.errno == errno.EIO and "step 2 was not saved" in str(e.value)
        assert targets.count(targets[0]) == 1  # the failed fsync was not retried
        assert mgr.steps() == [1] and temps(tmp) == []
    after = {
        n: open(os.path.join(tmp, "step_00000001", n), "rb").read()
        for n in os.listdir(os.path.join(tmp, "step_00000001"))
    }
    assert after == before
    with tk.CheckpointManager(tmp) as mgr:
        out = {"w": torch.empty(3), "step": 0}
        assert mgr.restore(out) == 1 and torch.equal(out["w"], torch.ones(3)) and out["step"] == 1
