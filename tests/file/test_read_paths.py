"""The fast read paths: the parsed-header cache and one tensor read in parts on several threads.

Both must be invisible: the same tensors, the same errors for damaged bytes, and a file changed
on disk is never read through a header parsed before the change.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorkeep as tk
from tensorkeep import knobs, threads
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
    monkeypatch.setattr(headers, "MAX_ENTRIES", 64)
    one = os.path.getsize(paths[0]) - 4  # about one header's bytes (the data is 4 bytes)
    monkeypatch.setattr(headers, "MAX_TOTAL_BYTES", one)  # a budget of bytes too: room for one header
    for p in paths:
        tk.open(p).close()
    assert len(headers._cache) == 1 and headers._total <= one


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


def test_a_file_changed_while_its_header_was_parsed_is_not_cached(tmp_path, parses, monkeypatch):
    from tensorkeep.storage.disk import DiskSource

    p = str(tmp_path / "a.tk")
    tk.save({"w": torch.zeros(2)}, p)
    real = DiskSource.reidentify
    monkeypatch.setattr(DiskSource, "reidentify", lambda self: (*real(self)[:4], real(self)[4] + 1))  # a new ctime
    tk.open(p).close()
    tk.open(p).close()
    assert parses == [p, p]


def test_plain_safetensors_headers_are_not_cached(tmp_path, parses):
    from safetensors.torch import save_file

    p = str(tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(2)}, p)  # no checksums: a stale header could not be caught by one
    tk.open(p).close()
    tk.open(p).close()
    assert parses == [p, p]


def test_a_forked_child_opens_files_while_the_parent_held_the_cache_lock(tmp_path, parses):
    p = str(tmp_path / "a.tk")
    tk.save({"w": torch.arange(3.0)}, p)
    tk.open(p).close()
    with headers._lock:  # as another thread of the parent might, at the moment of a fork
        pid = os.fork()
        if pid == 0:  # the child: would wait forever on the copied lock
            signal.alarm(20)
            try:
                with tk.open(p) as f:
                    os._exit(0 if torch.equal(f.get("w"), torch.arange(3.0)) else 1)
            except BaseException:
                os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_pool_work_runs_on_the_caller_once_a_pool_takes_no_more():
    pool = ThreadPoolExecutor(1)
    pool.shutdown()  # as every pool is while the interpreter exits
    assert threads.submit(pool, sum, [1, 2]).result() == 3
    assert threads.map(pool, abs, [-1, -2]) == [1, 2]
    with pytest.raises(ZeroDivisionError):
        threads.submit(pool, lambda: 1 / 0).result()
    with pytest.raises(ZeroDivisionError):
        threads.map(pool, lambda x: 1 / x, [1, 0])


EXIT_SCRIPT = """
import sys, torch, tensorkeep as tk
from tensorkeep import knobs
knobs.DIRECT_IO_MIN_BYTES = 1  # the direct-I/O writer: a thread pool of its own
mgr = tk.CheckpointManager(sys.argv[1], async_save=True)
mgr.save(1, {"w": torch.arange(1 << 20, dtype=torch.float32)})
# the script ends while the save is in flight: no wait(), no close()
"""


def test_an_async_save_in_flight_when_the_script_ends_is_finished(tmp_path):
    run = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, run], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "NOT saved" not in r.stderr, r.stderr[-2000:]
    with tk.CheckpointManager(run, read_only=True) as mgr:
        assert mgr.steps() == [1]
        state = {"w": torch.zeros(1 << 20)}
        assert mgr.restore(state) == 1 and torch.equal(state["w"], torch.arange(1 << 20, dtype=torch.float32))
