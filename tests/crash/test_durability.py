"""The durable-write protocol: a failed save leaves the old file byte-identical and no temp file;
fsyncs happen (file, then directory) and a failed fsync is fatal, never retried."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import tensorkeep as tk
from tensorkeep import knobs
from tensorkeep.file import writer
from tensorkeep.storage import local as _io


def state(seed: int = 0, n: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {f"l{i}.weight": torch.randn(64, 33, generator=g) for i in range(n)},
        "np": np.arange(100, dtype=np.int16),
        "step": seed,
        "f8": torch.ones(7).to(torch.float8_e4m3fn),
    }


def same(a, b) -> bool:
    return (
        all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        and np.array_equal(a["np"], b["np"])
        and a["step"] == b["step"]
        and torch.equal(a["f8"].view(torch.uint8), b["f8"].view(torch.uint8))
    )


def temps(d: str) -> list[str]:
    return [n for n in os.listdir(d) if _io.TMP_MARK in n]


@pytest.fixture(params=["one-write", "buffered", "direct"])
def io_path(request, monkeypatch):
    """The three ways a file is written: small ones assembled in memory and written at once,
    then per tensor through the page cache, then O_DIRECT through aligned staging buffers."""
    if request.param != "one-write":
        monkeypatch.setattr(knobs, "ONE_WRITE_BYTES", 0)
    if request.param == "direct":
        monkeypatch.setattr(knobs, "DIRECT_IO_MIN_BYTES", 1)
        monkeypatch.setattr(knobs, "CHUNK_BYTES", 8192)
    else:
        monkeypatch.setattr(knobs, "DIRECT_IO_MIN_BYTES", 1 << 40)
    return request.param


def test_both_io_paths_round_trip(tmp, io_path, monkeypatch):
    monkeypatch.setattr(knobs, "BLOCK_BYTES", 5000)
    obj = state(1)
    obj["odd"] = torch.arange(8193, dtype=torch.uint8)  # not a multiple of the chunk or the alignment
    p = os.path.join(tmp, "x.tk")
    opened = []
    real_open_new = _io.open_new
    monkeypatch.setattr(
        _io, "open_new", lambda path, direct=False: opened.append(direct) or real_open_new(path, direct)
    )
    tk.save(obj, p)
    assert opened == [io_path == "direct"]
    back = tk.load(p)
    assert same(obj, back) and torch.equal(back["odd"], obj["odd"])
    assert (os.path.getsize(p) - tk.open(p)._r.header.data_start) == sum(
        t.nbytes for t in tk.open(p)._r.header.tensors.values()
    )
    assert temps(tmp) == []


def test_durable_false_skips_fsync(tmp, fsync_calls):
    p = os.path.join(tmp, "scratch.tk")
    tk.save(state(2), p, durable=False)
    assert fsync_calls == [] and same(state(2), tk.load(p))


def test_durable_save_fsyncs_file_then_renames_then_fsyncs_directory(tmp, io_path, monkeypatch):
    events = []
    real_fsync, real_fsync_dir, real_replace = _io.fsync, _io.fsync_dir, _io.replace

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", os.path.basename(target)))
        real_fsync(fd)

    monkeypatch.setattr(_io, "fsync", fsync)
    monkeypatch.setattr(_io, "fsync_dir", lambda path: events.append(("fsync_dir", path)) or real_fsync_dir(path))
    monkeypatch.setattr(
        _io, "replace", lambda a, b: events.append(("replace", os.path.basename(b))) or real_replace(a, b)
    )
    p = os.path.join(tmp, "x.tk")
    tk.save(state(3), p)
    assert [e[0] for e in events] == ["fsync", "replace", "fsync_dir"]
    assert _io.TMP_MARK in events[0][1] and events[1][1] == "x.tk"
    assert os.path.samefile(events[2][1], tmp)
    assert same(state(3), tk.load(p))


@pytest.mark.parametrize("which", ["fsync", "fsync_dir"])
def test_failed_fsync_is_fatal_and_not_retried(tmp, monkeypatch, which):
    p = os.path.join(tmp, "x.tk")
    tk.save(state(0), p)
    before = open(p, "rb").read()
    calls = []

    def failing(arg):
        calls.append(arg)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(_io, which, failing)
    with pytest.raises(tk.SaveError) as e:
        tk.save(state(1), p)
    assert len(calls) == 1  # never retried
    assert e.value.errno == errno.EIO and "EIO" in str(e.value) and "fsync" in str(e.value)
    assert isinstance(e.value, OSError) and isinstance(e.value, tk.TensorkeepError)
    assert temps(tmp) == []
    if which == "fsync":  # before the rename: the old file is untouched
        assert open(p, "rb").read() == before
        assert "untouched" in str(e.value)
    else:  # after the rename: the new file is there, but may not survive a power cut; say so
        assert same(state(1), tk.load(p))
        assert "untouched" not in str(e.value) and "power" in str(e.value)


def count_writes(obj, p) -> int:
    n = [0]
    real = _io.pwrite_all

    def counting(*a):
        n[0] += 1
        return real(*a)

    _io.pwrite_all = counting
    try:
        tk.save(obj, p)
    finally:
        _io.pwrite_all = real
    return n[0]


def test_disk_full_after_every_write_leaves_old_file(tmp, io_path, monkeypatch):
    p = os.path.join(tmp, "ckpt.tk")
    tk.save(state(0), p)
    before = open(p, "rb").read()
    total = count_writes(state(1), os.path.join(tmp, "probe.tk"))
    os.unlink(os.path.join(tmp, "probe.tk"))
    assert total >= (1 if io_path == "one-write" else 2)
    real = _io.pwrite_all
    for fail_at in range(total):
        calls = [0]

        def pwrite_all(fd, buf, offset):
            calls[0] += 1
            if calls[0] > fail_at:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, buf, offset)

        monkeypatch.setattr(_io, "pwrite_all", pwrite_all)
        with pytest.raises(tk.SaveError) as e:
            tk.save(state(1), p)
        assert e.value.errno == errno.ENOSPC
        msg = str(e.value)
        assert "disk is full" in msg and "ckpt.tk" in msg and "untouched" in msg
        assert open(p, "rb").read() == before, fail_at
        assert temps(tmp) == [], fail_at
    monkeypatch.setattr(_io, "pwrite_all", real)
    assert same(state(0), tk.load(p))


def test_exception_while_converting_a_tensor(tmp, io_path, monkeypatch):
    p = os.path.join(tmp, "ckpt.tk")
    tk.save(state(0), p)
    before = open(p, "rb").read()
    real_source = writer._source
    seen = []

    def source(x, path, name):
        dt, shape, get = real_source(x, path, name)

        def broken():
            seen.append(name)
            if len(seen) == 3:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return get()

        return dt, shape, broken

    monkeypatch.setattr(writer, "_source", source)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        tk.save(state(1), p)
    assert len(seen) == 3
    assert open(p, "rb").read() == before and temps(tmp) == []


def test_keyboard_interrupt_mid_save(tmp, monkeypatch):
    monkeypatch.setattr(knobs, "ONE_WRITE_BYTES", 0)  # a write per tensor: the second one is mid-file
    p = os.path.join(tmp, "ckpt.tk")
    tk.save(state(0), p)
    before = open(p, "rb").read()
    real = _io.pwrite_all
    calls = [0]

    def interrupted(*a):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(_io, "pwrite_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tk.save(state(1), p)
    assert open(p, "rb").read() == before and temps(tmp) == []


def test_unwritable_directory(tmp):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    d = os.path.join(tmp, "ro")
    os.mkdir(d, 0o500)
    with pytest.raises(tk.SaveError) as e:
        tk.save(state(0), os.path.join(d, "x.tk"))
    assert e.value.errno == errno.EACCES and "permission" in str(e.value).lower()


def test_missing_directory(tmp):
    with pytest.raises(tk.SaveError) as e:
        tk.save(state(0), os.path.join(tmp, "no", "such", "x.tk"))
    assert e.value.errno == errno.ENOENT and temps(tmp) == []


FSIZE_CHILD = textwrap.dedent("""
    import errno, os, resource, signal, sys, torch
    import tensorkeep as tk
    from tensorkeep import knobs
    path, direct = sys.argv[1], sys.argv[2] == "direct"
    knobs.DIRECT_IO_MIN_BYTES = 1 if direct else 1 << 40
    knobs.CHUNK_BYTES = 64 << 10
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))
    try:
        tk.save({"w": torch.randn(1 << 18), "step": 1}, path)
    except tk.SaveError as e:
        print("SaveError", errno.errorcode.get(e.errno), e)
    else:
        print("saved")
""")


@pytest.mark.parametrize("mode", ["buffered", "direct"])
def test_real_file_size_limit_in_a_subprocess(tmp, mode):
    """RLIMIT_FSIZE makes the kernel refuse the write (EFBIG), as a full disk would (ENOSPC)."""
    p = os.path.join(tmp, "ckpt.tk")
    tk.save(state(0), p)
    before = open(p, "rb").read()
    r = subprocess.run([sys.executable, "-c", FSIZE_CHILD, p, mode], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("SaveError EFBIG"), r.stdout + r.stderr
    assert "larger than this process or file system allows" in r.stdout
    assert open(p, "rb").read() == before and temps(tmp) == []
    assert same(state(0), tk.load(p))


def test_replacing_keeps_other_files_and_overwrites_atomically(tmp):
    p = os.path.join(tmp, "x.tk")
    open(os.path.join(tmp, "neighbour"), "w").write("keep me")
    for i in range(3):
        tk.save(state(i, n=1), p)
        assert same(state(i, n=1), tk.load(p))
    assert sorted(os.listdir(tmp)) == ["neighbour", "x.tk"]
