"""The fast read paths: the parsed-header cache and one tensor read in parts on several threads.

Both must be invisible: the same tensors, the same errors for damaged bytes, and a file changed
on disk is never read through a header parsed before the change.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorkeep as tk
from tensorkeep import knobs
from tensorkeep.file import headers, reader, workers
from tensorkeep.verification import verify


@pytest.fixture
def parses(monkeypatch):
    """Count header parses; the cache starts empty and keeps headers of files of any age."""
    headers.clear()
    monkeypatch.setattr(headers, "SETTLE_SECONDS", 0.0)
    calls = []
    real = reader.parse_header
    monkeypatch.setattr(reader, "parse_header", lambda *a: calls.append(a[2]) or real(*a))
    yield calls
    headers.clear()


def test_a_second_open_of_an_unchanged_file_reuses_its_parsed_header(tmp_path, parses):
    p = str(tmp_path / "a.tk")
    tk.save({"w": torch.arange(6.0), "b": torch.ones(2)}, p, metadata={"note": "x"})
    for _ in range(3):
        with tk.open(p) as f:
            assert torch.equal(f.get("w"), torch.arange(6.0)) and f.metadata == {"note": "x"}
    assert parses == [p]


def test_a_file_saved_a_moment_ago_is_not_cached(tmp_path, parses, monkeypatch):
    monkeypatch.setattr(headers, "SETTLE_SECONDS", 60.0)
    p = str(tmp_path / "a.tk")
    tk.save({"w": torch.arange(6.0)}, p)
    tk.open(p).close()
    tk.open(p).close()
    assert parses == [p, p]


def test_a_file_replaced_or_changed_in_place_is_parsed_again(tmp_path, parses):
    p, q = str(tmp_path / "a.tk"), str(tmp_path / "b.tk")
    tk.save({"w": torch.zeros(4)}, p, metadata={"v": "1"})
    tk.save({"w": torch.ones(4)}, q, metadata={"v": "2"})  # the same size: only the bytes differ
    assert os.path.getsize(p) == os.path.getsize(q)
    assert tk.open(p).metadata == {"v": "1"}
    tk.save({"w": torch.full((4,), 2.0)}, p, metadata={"v": "3"})  # replaced: a new inode
    with tk.open(p) as f:
        assert f.metadata == {"v": "3"} and torch.equal(f.get("w"), torch.full((4,), 2.0))
    time.sleep(0.05)  # a later tick of the filesystem's clock: in-place writes change the ctime
    with open(p, "r+b") as f:  # written in place, the same inode and size
        f.write(open(q, "rb").read())
    with tk.open(p) as f:
        assert f.metadata == {"v": "2"} and torch.equal(f.get("w"), torch.ones(4))
    assert parses.count(p) == 3


def test_what_open_hands_out_cannot_change_the_cached_header(tmp_path, parses):
    p = str(tmp_path / "a.tk")
    tk.save({"w": torch.zeros(2)}, p, metadata={"k": "v"})
    with tk.open(p) as f:
        f.metadata["k"] = "changed"
        f.metadata["new"] = "x"
    with tk.open(p) as f:
        assert f.metadata == {"k": "v"}


def test_verify_reads_the_header_on_disk_not_a_cached_one(tmp_path, parses, monkeypatch):
    p = str(tmp_path / "a.tk")
    tk.save({"w": torch.zeros(2)}, p)
    tk.open(p).close()
    monkeypatch.setattr(headers, "get", lambda identity: pytest.fail("verify used the header cache"))
    assert verify(p).ok
    assert parses == [p, p]


def test_the_cache_keeps_a_bounded_number_of_headers(tmp_path, parses, monkeypatch):
    monkeypatch.setattr(headers, "MAX_ENTRIES", 2)
    paths = [str(tmp_path / f"{i}.tk") for i in range(4)]
    for p in paths:
        tk.save({"w": torch.zeros(1)}, p)
        tk.open(p).close()
    assert len(headers._cache) == 2
    tk.open(paths[0]).close()  # dropped first: parsed again
    assert parses.count(paths[0]) == 2


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Blocks, pieces and the split threshold small enough that a few KB crosses every boundary
    (the same for every example: nothing a test changes)."""
    monkeypatch.setattr(knobs, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(knobs, "READ_PIECE_BYTES", 1000)  # pieces that do not divide a block
    monkeypatch.setattr(knobs, "SPLIT_READ_BYTES", 1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 40_000), threads=st.sampled_from([1, 2, 3, 5]), flip=st.floats(0, 1))
def test_a_tensor_read_in_parts_is_whole_and_verified(tmp_path_factory, tiny_blocks, n, threads, flip):
    knobs.IO_THREADS = threads
    try:
        p = str(tmp_path_factory.mktemp("split") / "t.tk")
        data = torch.from_numpy(np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8))
        tk.save({"x": data, "pad": torch.ones(3)}, p)
        with tk.open(p) as f:
            assert torch.equal(f.get("x"), data)
            assert torch.equal(f.read_into("x", torch.empty_like(data), atomic=False), data)
            assert torch.equal(f.get("x", verify=False), data)
            start = f._r.header.data_start + f.info("x").begin
        if n:
            at = start + min(int(flip * n), n - 1)
            raw = bytearray(open(p, "rb").read())
            raw[at] ^= 0x10
            open(p, "wb").write(raw)
            damaged = f"tensor 'x' is damaged.*bytes {(at - start) // 4096 * 4096}"
            for lazy in (False, True):  # read into memory, or checked through the mapping
                with tk.open(p) as f, pytest.raises(tk.ChecksumError, match=damaged):
                    f.get("x", lazy=lazy)
    finally:
        knobs.IO_THREADS = 2


def test_a_plain_safetensors_tensor_is_read_in_parts_too(tmp_path, tiny_blocks):
    from safetensors.torch import save_file

    p = str(tmp_path / "plain.safetensors")
    x = torch.randn(3001)
    save_file({"x": x}, p)
    with tk.open(p) as f:
        assert torch.equal(f.get("x"), x)


def test_the_pool_runs_tasks_inline_from_its_own_threads():
    # a task that waits on the pool from inside it would wait forever if it were queued
    assert workers.run_all([lambda: workers.run_all([lambda: 1, lambda: 2]), lambda: 3]) == [[1, 2], 3]


def test_the_pool_raises_the_first_error_after_every_task_ended():
    done = []

    def slow() -> None:
        time.sleep(0.05)
        done.append(1)

    def bad() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        workers.run_all([bad, slow])
    assert done == [1]
