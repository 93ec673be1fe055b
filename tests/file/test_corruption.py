"""Every single flipped bit and every truncation of a tensorkeep file raises ChecksumError.

--corruption-bits: "all" (default) flips every bit of the small file (load checked for each; lazy
load, open().get and get_slice for one bit per byte), "byte" one bit per byte only.
--corruption-samples (default 300): positions sampled in the large (multi-block, direct-I/O) file.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

import tensorkeep as tk
from support import sizes
from tensorkeep import knobs
from tensorkeep.core import format as fmt


def small_obj():
    return {
        "w": torch.arange(60, dtype=torch.float32).reshape(20, 3),  # 240 bytes: 4 blocks of 64
        "b": torch.arange(5, dtype=torch.int16),
        "np": np.arange(6, dtype=np.uint8).reshape(2, 3),
        "0d": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "plain": [1, 2.5, "x", None],
    }


@pytest.fixture
def small_file(tmp, monkeypatch):
    monkeypatch.setattr(knobs, "BLOCK_BYTES", 64)
    p = os.path.join(tmp, "small.tk")
    tk.save(small_obj(), p)
    data = open(p, "rb").read()
    return p, data, fmt.parse_header(data, len(data), p)


def owner(h: fmt.Header, pos: int) -> fmt.TensorInfo | None:
    """The tensor whose bytes hold file offset ``pos`` (None: in the prefix or header)."""
    for t in h.tensors.values():
        if h.data_start + t.begin <= pos < h.data_start + t.end:
            return t
    return None


def row_of(t: fmt.TensorInfo, pos_in_tensor: int) -> int | None:
    if not t.shape or t.shape[0] == 0:
        return None
    return pos_in_tensor // (t.nbytes // t.shape[0])


def check_damaged(p: str, h: fmt.Header, pos: int, good: dict, full: bool = True) -> None:
    """load raises ChecksumError naming the damaged tensor; with ``full``, so do lazy loads,
    open().get and get_slice of the rows holding the damage, while other tensors still read fine."""
    with pytest.raises(tk.ChecksumError) as e:
        tk.load(p)
    t = owner(h, pos)
    if t is not None:
        assert repr(t.name) in str(e.value), str(e.value)
    if not full:
        return
    with pytest.raises(tk.ChecksumError):
        tk.load(p, lazy=True)
    if t is None:  # header damage: the file cannot be opened at all
        with pytest.raises(tk.ChecksumError):
            tk.open(p)
        return
    with tk.open(p) as f:
        with pytest.raises(tk.ChecksumError, match=repr(t.name)):
            f.get(t.name)
        with pytest.raises(tk.ChecksumError, match=repr(t.name)):
            f.get(t.name, lazy=True)  # checked through the mapping
        row = row_of(t, pos - h.data_start - t.begin)
        if row is not None:
            with pytest.raises(tk.ChecksumError):
                f.get_slice(t.name)[row]
            with pytest.raises(tk.ChecksumError):
                f.get_slice(t.name)[row : row + 1]
        else:
            with pytest.raises(tk.ChecksumError):
                f.get_slice(t.name)[...]
        for other in f.keys():  # the rest of the file still reads back right
            if other != t.name:
                assert raw(f.get(other)) == good[other], other
                assert raw(f.get(other, lazy=True)) == good[other], other


def raw(x) -> bytes:
    return (
        x.reshape(-1).view(torch.uint8).numpy() if isinstance(x, torch.Tensor) else x.reshape(-1).view(np.uint8)
    ).tobytes()


def good_bytes(p: str) -> dict:
    with tk.open(p) as f:
        return {k: raw(f.get(k)) for k in f.keys()}


@pytest.mark.fuzz
def test_every_bit_flip_is_detected(small_file):
    p, data, h = small_file
    good = good_bytes(p)
    assert len(h.tensors) == 5 and h.is_tensorkeep
    assert max(t.nbytes for t in h.tensors.values()) > 3 * knobs.BLOCK_BYTES
    flips = 0
    for pos in range(len(data)):
        bits = range(8) if sizes.corruption_bits == "all" else [pos % 8]
        for bit in bits:
            with open(p, "r+b") as f:
                f.seek(pos)
                f.write(bytes([data[pos] ^ (1 << bit)]))
            check_damaged(p, h, pos, good, full=bit == pos % 8)
            flips += 1
        with open(p, "r+b") as f:
            f.seek(pos)
            f.write(data[pos : pos + 1])
    assert flips >= len(data)


def test_every_truncation_is_detected(small_file):
    p, data, h = small_file
    for n in range(len(data) - 1, -1, -1):
        os.truncate(p, n)
        for attempt in (lambda: tk.load(p), lambda: tk.load(p, lazy=True), lambda: tk.open(p)):
            with pytest.raises(tk.ChecksumError):
                attempt()


def test_appended_bytes_are_detected(small_file):
    p, data, h = small_file
    for extra in (b"\0", b" ", b"x" * 100):
        with open(p, "wb") as f:
            f.write(data + extra)
        with pytest.raises(tk.ChecksumError, match="trailing"):
            tk.load(p)


def test_verify_false_reads_without_checking(small_file):
    p, data, h = small_file
    t = h.tensors["w"]
    bad = bytearray(data)
    bad[h.data_start + t.begin] ^= 1
    open(p, "wb").write(bad)
    out = tk.load(p, verify=False)
    assert not torch.equal(out["w"], small_obj()["w"])  # the damage is visible, not hidden
    with pytest.raises(tk.ChecksumError):
        tk.load(p)


@pytest.mark.fuzz
def test_large_file_sampled_flips_and_truncations(tmp, monkeypatch):
    """A multi-megabyte file written through the direct-I/O path, with 64 KiB checksum blocks."""
    monkeypatch.setattr(knobs, "BLOCK_BYTES", 64 << 10)
    monkeypatch.setattr(knobs, "DIRECT_IO_MIN_BYTES", 1)
    monkeypatch.setattr(knobs, "CHUNK_BYTES", 256 << 10)
    monkeypatch.setattr(knobs, "TASK_BYTES", 256 << 10)
    g = torch.Generator().manual_seed(1)
    obj = {
        "big": torch.randn(1 << 20, generator=g).reshape(1024, 1024),
        "small": torch.arange(3),
        "half": torch.randn(3000, generator=g).half(),
    }
    p = os.path.join(tmp, "big.tk")
    tk.save(obj, p)
    data = open(p, "rb").read()
    h = fmt.parse_header(data, len(data), p)
    assert h.data_start % knobs.ALIGN == 0  # laid out for direct I/O
    rng = random.Random(0)
    positions = sorted(
        {rng.randrange(len(data)) for _ in range(sizes.corruption_samples)}
        | set(range(0, h.data_start, max(1, h.data_start // 20)))
        | {h.data_start + t.begin for t in h.tensors.values()}
        | {h.data_start + t.end - 1 for t in h.tensors.values()}
        | {len(data) - 1}
    )
    with open(p, "r+b") as f:
        for pos in positions:
            bit = 1 << rng.randrange(8)
            f.seek(pos)
            f.write(bytes([data[pos] ^ bit]))
            f.flush()
            with pytest.raises(tk.ChecksumError) as e:
                tk.load(p)
            t = owner(h, pos)
            if t is not None:
                assert repr(t.name) in str(e.value)
                with tk.open(p) as r, pytest.raises(tk.ChecksumError):
                    row = row_of(t, pos - h.data_start - t.begin)
                    r.get_slice(t.name)[row] if row is not None else r.get(t.name)
            f.seek(pos)
            f.write(bytes([data[pos]]))
            f.flush()
    assert torch.equal(tk.load(p)["big"], obj["big"])
    for n in sorted(
        {rng.randrange(len(data)) for _ in range(sizes.corruption_samples // 10)} | {0, 7, 8, 9, h.data_start}
    ):
        q = os.path.join(tmp, "cut.tk")
        with open(q, "wb") as f:
            f.write(data[:n])
        with pytest.raises(tk.ChecksumError):
            tk.load(q)
