"""The storage conformance suite: what every :class:`~tensorkeep.storage.base.Backend` promises.

A backend gets the whole suite by subclassing :class:`BackendTests` under a name pytest collects
(``Test…``) and providing a ``backend`` fixture: a fresh, empty backend per test. Optionally also:

- ``fault``: a (parametrized) fixture returning a :class:`Fault`, one way its writes fail below it
  (an fsync returning EIO, a PUT refused, the network cut); without it those tests are skipped.
- :meth:`BackendTests.leftovers`: what a write may leave that is not an object (temporary files,
  unfinished multipart uploads); after any failed write it must be empty.
- ``known_bugs``: ``{test name or name[param id]: reason}``, run as strict xfails until fixed.

Nothing here knows which backend it tests; backend-specific tests live in the subclasses::

    class TestMyStore(BackendTests):
        @pytest.fixture
        def backend(self):
            return MyStore(...)
"""

from __future__ import annotations

import errno
import io
import mmap
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorkeep.errors import FormatError, SaveError
from tensorkeep.storage import objects

#: Keys every backend stores, lists, reads and deletes as they are (odd but legal).
ODD_KEYS = ["with space.bin", "plus+equals=at@comma,.bin", "unicodé/日本語.bin", "percent%20hash#tilde~.bin"]
ODD_KEYS += [".hidden", "-dash_under", "quote'bang!(paren)$;&.bin", "a/b/c/d/e/f/deep.bin", "..dots..", "x..", "c:d;"]
#: Keys every backend refuses (ValueError): empty, absolute, not normalized, or leaving the root.
BAD_KEYS = ["", "/abs.bin", "..", ".", "../up.bin", "a/../../up.bin", "a/..", "./a", "a/./b", "a//b", "a/"]
BAD_KEYS += ["nul\x00.bin"]
#: Keys no one of which is a directory of another (a file system could not hold both ``a`` and ``a/b``).
MODEL_KEYS = ["x", "y", "d/x", "d/y", "d/e/x", "de", "d.x"]

_SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.differing_executors],
)


@dataclass
class Fault:
    """One way a backend's writes fail: while ``active()`` is entered, a write of ``size`` bytes fails
    below the backend (the disk, the network, the store), never in the caller's chunks. ``after``
    runs once the fault is gone and before :meth:`BackendTests.leftovers` is checked."""

    active: Callable[[], AbstractContextManager[Any]]
    size: int = 1000
    after: Callable[[], Any] = lambda: None


def payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def pieces(data: bytes, sizes: Iterable[int]) -> Iterator[memoryview]:
    """``data`` cut into chunks of these sizes, cycled (zero-length chunks included)."""
    sizes, mv, at, i = list(sizes), memoryview(data), 0, 0
    while at < len(mv):
        n = sizes[i % len(sizes)]
        yield mv[at : at + n]
        at, i = at + n, i + 1


def failing(data: bytes, exc: BaseException, after: int) -> Iterator[bytes]:
    """``data`` in 100-byte chunks, raising ``exc`` before chunk ``after`` (-1: after the last one)."""
    for i, c in enumerate(pieces(data, [100])):
        if i == after:
            raise exc
        yield bytes(c)
    raise exc


def where(backend: Any, key: str) -> str:
    """How messages name ``key`` of ``backend``: its URL or path."""
    return f"{backend.url}/{key}"


class BackendTests:
    """Subclass under a ``Test…`` name and provide a ``backend`` fixture (and optionally ``fault``)."""

    #: ``{test name or "name[param id]": reason}``: tests that fail on this backend because of a known bug.
    known_bugs: ClassVar[dict[str, str]] = {}
    #: The part size :meth:`small_parts` sets (a store with a minimum part size sets its own).
    part_bytes: ClassVar[int] = 64 << 10

    def leftovers(self, backend: Any) -> list[str]:
        """What writes left in ``backend`` that is not an object (none unless a subclass looks)."""
        return []

    # ------------------------------------------------------------------ fixtures

    @pytest.fixture(autouse=True)
    def _known_bug(self, request: pytest.FixtureRequest) -> None:
        reason = self.known_bugs.get(request.node.name) or self.known_bugs.get(request.node.originalname)
        if reason:
            request.applymarker(pytest.mark.xfail(strict=True, reason=reason))

    @pytest.fixture
    def fault(self) -> Fault:
        pytest.skip("this backend injects no faults (give its test class a `fault` fixture)")

    @pytest.fixture
    def small_parts(self, monkeypatch: pytest.MonkeyPatch) -> int:
        """Ranged reads and multipart uploads in parts of ``part_bytes`` (``storage.objects.PART_BYTES``)."""
        monkeypatch.setattr(objects, "PART_BYTES", self.part_bytes)
        monkeypatch.setattr(objects, "THREADS", 3)
        return self.part_bytes

    # ------------------------------------------------------------------ write and read

    def test_write_then_read(self, backend):
        backend.write("a.bin", [b"hello ", b"world"], 11)
        backend.write("dir/sub/b.bin", [b"x" * 1000], 1000)
        assert backend.read("a.bin") == b"hello world" and backend.size("a.bin") == 11
        assert backend.read("dir/sub/b.bin") == b"x" * 1000 and backend.exists("dir/sub/b.bin")
        assert backend.list() == {"a.bin": 11, "dir/sub/b.bin": 1000}

    @pytest.mark.parametrize("durable", [True, False])
    def test_durable_or_not_a_write_is_whole(self, backend, durable):
        backend.write("k", [b"one"], 3, durable=durable)
        backend.write("k", [b"second"], 6, durable=durable)
        assert backend.read("k") == b"second" and backend.list() == {"k": 6}

    @pytest.mark.parametrize("chunks", [[], [b""], [b"", b"", b""]], ids=["none", "one-empty", "three-empty"])
    def test_an_empty_object(self, backend, chunks):
        backend.write("empty", chunks, 0)
        assert backend.read("empty") == b"" and backend.size("empty") == 0 and backend.exists("empty")
        assert backend.read_range("empty", 0, 0) == b"" and backend.list() == {"empty": 0}
        src = backend.open("empty")
        try:
            assert src.size == 0 and src.pread(0, 0) == b""
        finally:
            src.close()

    def test_chunk_types(self, backend):
        f32 = np.arange(12, dtype=np.float32).reshape(3, 4)
        chunks = [b"by", bytearray(b"ba"), memoryview(b"--mv--")[2:4], np.frombuffer(b"np", np.uint8)]
        chunks += [np.arange(3, dtype=np.uint8), f32, b"", memoryview(bytearray(b"end"))]
        want = b"byba" + b"mv" + b"np" + bytes([0, 1, 2]) + f32.tobytes() + b"end"
        backend.write("k", iter(chunks), len(want))  # any iterable: a one-pass iterator too
        assert backend.read("k") == want

    def test_overwrite_longer_then_shorter(self, backend):
        for data in (b"abc", b"abcdefghij", b"xy", b""):
            backend.write("k", [data], len(data))
            assert backend.read("k") == data and backend.size("k") == len(data) and backend.list() == {"k": len(data)}

    @pytest.mark.parametrize(
        "start,end", [(0, 100), (10, 20), (99, 100), (90, 200), (0, 0), (50, 50), (60, 40), (100, 100), (150, 120)]
    )
    def test_read_range(self, backend, start, end):
        data = payload(100)
        backend.write("k", [data], 100)
        assert backend.read_range("k", start, end) == data[start:end]

    @pytest.mark.parametrize("start,end", [(100, 101), (100, 150), (150, 200)])
    def test_a_range_at_or_past_the_end_is_empty(self, backend, start, end):
        backend.write("k", [payload(100)], 100)
        backend.write("empty", [], 0)
        assert backend.read_range("k", start, end) == b"" and backend.read_range("empty", 0, end) == b""

    @pytest.mark.parametrize("start", [0, 60])
    def test_a_huge_range_end_reads_what_there_is(self, backend, start):
        """``end`` past the end is "to the end": nothing is allocated for bytes that are not there."""
        data = payload(100)
        backend.write("k", [data], 100)
        assert backend.read_range("k", start, 1 << 62) == data[start:]

    def test_a_negative_range_start_is_refused(self, backend):
        backend.write("k", [b"0123456789"], 10)
        with pytest.raises((ValueError, OSError)):
            backend.read_range("k", -3, 10)  # never "the last 3 bytes"

    @_SETTINGS
    @given(
        data=st.binary(max_size=3000),
        cuts=st.lists(st.integers(0, 700), min_size=1, max_size=6),
        ranges=st.lists(st.tuples(st.integers(0, 3100), st.integers(-50, 3200)), max_size=4),
    )
    def test_any_chunking_reads_back_exactly(self, backend, data, cuts, ranges):
        """Any bytes written in any chunks read back whole, and by any range that starts inside them."""
        key = f"h/{uuid.uuid4().hex}"
        backend.write(key, pieces(data, cuts if any(cuts) else [1]), len(data))
        assert backend.read(key) == data and backend.size(key) == len(data)
        src = backend.open(key)
        try:
            for s, n in ranges:
                s = s % len(data) if data else 0
                n = n if data else min(n, 0)
                want = data[s : s + max(n, 0)]  # an end at or before the start: nothing
                assert backend.read_range(key, s, s + n) == want and src.pread(max(n, 0), s) == want
        finally:
            src.close()

    def test_large_object_crossing_parts(self, backend, small_parts):
        part = small_parts
        data = payload(2 * part + part // 2 + 7, seed=1)
        backend.write("big/x.bin", pieces(data, [part // 3 + 1, 0, 5, part + 11]), len(data))
        assert backend.size("big/x.bin") == len(data) and backend.read("big/x.bin") == data
        assert backend.read_range("big/x.bin", part - 5, part + 5) == data[part - 5 : part + 5]
        src = backend.open("big/x.bin")
        try:
            buf = np.zeros(len(data) + 100, np.uint8)  # larger than what is left: a short read, counted
            assert src.readinto(buf, 0) == len(data) and buf[: len(data)].tobytes() == data
            tail = bytearray(part + 3)
            assert src.readinto(tail, len(data) - part - 3) == part + 3 and bytes(tail) == data[-(part + 3) :]
        finally:
            src.close()

    # ------------------------------------------------------------------ missing keys and non-objects

    def test_a_missing_key(self, backend):
        assert not backend.exists("nope") and backend.list() == {}
        calls = [lambda: backend.read("nope"), lambda: backend.read_range("nope", 0, 5)]
        calls += [lambda: backend.size("nope"), lambda: backend.open("nope")]
        for call in calls:
            with pytest.raises(FileNotFoundError, match="nope"):
                call()

    def test_a_directory_is_not_an_object(self, backend):
        backend.write("d/x.bin", [b"123"], 3)
        assert not backend.exists("d") and backend.list() == {"d/x.bin": 3}
        with pytest.raises(FileNotFoundError):
            backend.size("d")
        with pytest.raises((FileNotFoundError, FormatError)):
            backend.open("d")
        with pytest.raises((FileNotFoundError, FormatError)):
            backend.read("d")

    def test_an_object_under_an_object_name(self, backend):
        """``a/b`` when ``a`` is an object: stored (an object store has no directories) or
        :class:`SaveError` (a file system); either way ``a`` is intact."""
        backend.write("a", [b"file"], 4)
        try:
            backend.write("a/b", [b"under"], 5)
        except SaveError as e:
            assert where(backend, "a") in str(e) and backend.list() == {"a": 4}
        else:
            assert backend.read("a/b") == b"under" and backend.list() == {"a": 4, "a/b": 5}
        assert backend.read("a") == b"file" and self.leftovers(backend) == []

    # ------------------------------------------------------------------ the publish protocol

    @pytest.mark.parametrize("after", [0, 3, -1], ids=["before-the-first", "midway", "after-the-last"])
    def test_chunks_failing_midway_keep_the_previous_object(self, backend, after):
        backend.write("k", [b"old"], 3)
        chunks = failing(payload(1000), OSError(errno.EIO, "the source could not be read"), after)
        with pytest.raises(SaveError, match="could not be read") as err:
            backend.write("k", chunks, 1000)
        assert where(backend, "k") in str(err.value)
        assert backend.read("k") == b"old" and backend.list() == {"k": 3} and self.leftovers(backend) == []

    def test_a_caller_error_in_the_chunks_passes_through(self, backend):
        """Not an I/O failure: the caller's own exception comes back as it was, nothing is written."""
        backend.write("k", [b"old"], 3)
        with pytest.raises(KeyError, match="caller bug"):
            backend.write("k", failing(payload(1000), KeyError("caller bug"), 2), 1000)
        with pytest.raises(KeyError, match="caller bug"):
            backend.write("new", failing(payload(1000), KeyError("caller bug"), 2), 1000)
        assert backend.read("k") == b"old" and backend.list() == {"k": 3} and self.leftovers(backend) == []

    def test_a_write_in_progress_is_invisible(self, backend):
        """Until a write returns, readers and listings see the previous object (or none)."""
        backend.write("k", [b"old"], 3)
        seen: list[Any] = []

        def chunks() -> Iterator[bytes]:
            yield b"new-"
            seen.append((backend.list(), backend.exists("new"), backend.read("k"), backend.size("k")))
            yield b"data"

        backend.write("k", chunks(), 8)
        backend.write("new", chunks(), 8)
        assert seen == [({"k": 3}, False, b"old", 3), ({"k": 8}, False, b"new-data", 8)]
        assert backend.list() == {"k": 8, "new": 8} and self.leftovers(backend) == []

    def test_a_large_write_failing_after_some_parts_keeps_the_previous_object(self, backend, small_parts):
        """Parts already sent (where parts are sent) are neither visible meanwhile nor kept after."""
        part = small_parts
        backend.write("k", [b"old"], 3)
        data, seen = payload(3 * part), []

        def chunks() -> Iterator[Any]:
            yield data[: 2 * part + 1]  # two parts are full
            seen.append((backend.list(), backend.read("k")))
            raise KeyError("stopped")

        with pytest.raises(KeyError, match="stopped"):
            backend.write("k", chunks(), 3 * part)
        assert seen == [({"k": 3}, b"old")]
        assert backend.read("k") == b"old" and backend.list() == {"k": 3} and self.leftovers(backend) == []

    def test_concurrent_writers_leave_one_whole_version(self, backend):
        versions = [bytes([i]) * (1000 + 100 * i) for i in range(4)]
        errors: list[BaseException] = []

        def writer(v: bytes) -> None:
            try:
                for _ in range(3):
                    backend.write("k", pieces(v, [333]), len(v))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(v,)) for v in versions]
        for t in threads:
            t.start()
        for _ in range(5):
            if backend.exists("k"):
                assert backend.read("k") in versions
        for t in threads:
            t.join()
        assert not errors and backend.read("k") in versions
        assert backend.list() == {"k": len(backend.read("k"))} and self.leftovers(backend) == []

    def test_injected_fault_keeps_the_previous_object(self, backend, fault):
        backend.write("k", [b"old"], 3)
        data = payload(fault.size)
        with fault.active():
            with pytest.raises(SaveError) as err:
                backend.write("k", pieces(data, [fault.size // 3 + 1]), len(data))
            with pytest.raises(SaveError):
                backend.write("fresh", [data], len(data))
        fault.after()
        assert where(backend, "k") in str(err.value) and "untouched" in str(err.value)
        assert backend.read("k") == b"old" and backend.list() == {"k": 3} and self.leftovers(backend) == []
        backend.write("k", [data], len(data))  # the fault gone, the backend works again
        assert backend.read("k") == data and backend.list() == {"k": len(data)}

    # ------------------------------------------------------------------ listing

    def test_an_empty_store_lists_nothing(self, backend):
        assert backend.list() == {} and backend.list("a") == {} and backend.list("a/") == {}

    _NESTED: ClassVar[dict[str, int]] = {
        "a.bin": 1,
        "ab/c.bin": 2,
        "ab/d/e.bin": 3,
        "abc": 4,
        "b/x.bin": 5,
        "ab.bin": 6,
    }

    @pytest.mark.parametrize("prefix", ["", "ab/", "ab/d/", "b/", "zz/", "abc/"])
    def test_list_by_directory_prefix(self, backend, prefix):
        for k, n in self._NESTED.items():
            backend.write(k, [b"z" * n], n)
        assert backend.list(prefix) == {k: n for k, n in self._NESTED.items() if k.startswith(prefix)}

    @pytest.mark.parametrize("prefix", ["a", "ab", "ab/d", "ab/c", "a.bin", "b"])
    def test_list_by_any_prefix(self, backend, prefix):
        """The prefix is a string prefix of the key, not only a directory (as the protocol says)."""
        for k, n in self._NESTED.items():
            backend.write(k, [b"z" * n], n)
        assert backend.list(prefix) == {k: n for k, n in self._NESTED.items() if k.startswith(prefix)}

    @_SETTINGS
    @given(ops=st.lists(st.tuples(st.sampled_from(MODEL_KEYS), st.integers(-1, 40)), max_size=12))
    def test_list_matches_a_model_after_any_writes_and_deletes(self, backend, ops):
        """Writes (size >= 0) and deletes (-1) in any order: list, exists and size agree with a dict."""
        backend.delete(backend.list())
        model: dict[str, int] = {}
        for key, n in ops:
            if n < 0:
                backend.delete([key])
                model.pop(key, None)
            else:
                backend.write(key, [bytes([n]) * n], n)
                model[key] = n
        assert backend.list() == model and backend.list("d/") == {k: n for k, n in model.items() if k[:2] == "d/"}
        assert all(backend.exists(k) == (k in model) for k in MODEL_KEYS)
        assert all(backend.size(k) == n and backend.read(k) == bytes([n]) * n for k, n in model.items())

    # ------------------------------------------------------------------ deletion

    def test_delete_only_what_is_named(self, backend):
        for k in ["a", "b", "c", "d/x", "d/y", "dd"]:
            backend.write(k, [k.encode()], len(k))
        backend.delete(["a", "missing", "c", "d/missing/too"])  # a missing key in the batch stops nothing
        assert backend.list() == {"b": 1, "d/x": 3, "d/y": 3, "dd": 2}
        backend.delete(["d"])  # a "directory": not an object, so nothing
        backend.delete([])
        backend.delete(k for k in ["d/x"])  # any iterable
        assert backend.list() == {"b": 1, "d/y": 3, "dd": 2} and not backend.exists("a")
        backend.write("a", [b"again"], 5)
        assert backend.read("a") == b"again"

    def test_deleting_missing_keys_is_fine(self, backend):
        backend.delete(["missing"])
        backend.delete(["missing", "d/missing"])
        backend.write("k", [b"1"], 1)
        backend.delete(["k"])
        backend.delete(["k"])
        assert backend.list() == {} and not backend.exists("k")

    def test_delete_never_globs(self, backend):
        for k in ["a*", "ab", "a?", "ac", "a[b]", "b/*", "b/x"]:
            backend.write(k, [b"1"], 1)
        backend.delete(["a*", "a?", "a[b]", "b/*"])
        assert sorted(backend.list()) == ["ab", "ac", "b/x"]

    # ------------------------------------------------------------------ keys

    def test_odd_but_legal_keys(self, backend):
        for k in ODD_KEYS:
            backend.write(k, [k.encode()], len(k.encode()))
        assert backend.list() == {k: len(k.encode()) for k in ODD_KEYS}
        for k in ODD_KEYS:
            assert backend.exists(k) and backend.read(k) == k.encode() and backend.size(k) == len(k.encode()), k
        backend.delete(ODD_KEYS[::2])
        assert backend.list() == {k: len(k.encode()) for k in ODD_KEYS[1::2]}

    @pytest.mark.parametrize("key", BAD_KEYS)
    def test_a_key_that_is_not_below_the_root_is_refused(self, backend, key):
        backend.write("a/b", [b"x"], 1)
        calls = [lambda: backend.write(key, [b"y"], 1), lambda: backend.read(key), lambda: backend.size(key)]
        calls += [lambda: backend.read_range(key, 0, 1), lambda: backend.exists(key), lambda: backend.open(key)]
        for call in [*calls, lambda: backend.delete([key])]:
            with pytest.raises(ValueError):
                call()
        assert backend.list() == {"a/b": 1}

    # ------------------------------------------------------------------ Source

    def test_source_reads(self, backend):
        data = payload(5000, seed=3)
        backend.write("s/k.bin", [data], len(data))
        src = backend.open("s/k.bin")
        try:
            assert src.size == 5000 and "s/k.bin" in src.name
            assert src.pread(10, 0) == data[:10] and src.pread(10, 4995) == data[4995:] and src.pread(0, 7) == b""
            for buf in (bytearray(100), np.zeros(100, np.uint8), memoryview(bytearray(300))[100:200]):
                assert src.readinto(buf, 1234) == 100 and memoryview(buf).cast("B").tobytes() == data[1234:1334]
            f32 = np.zeros(25, np.float32)
            assert src.readinto(f32, 1234) == 100 and f32.tobytes() == data[1234:1334]
            assert src.readinto(bytearray(100), 4950) == 50
            whole = src.whole()
            if isinstance(whole, str):
                with open(whole, "rb") as f:
                    assert f.read() == data
            else:
                assert isinstance(whole, io.IOBase) and whole.read() == data
            if src.mappable:
                with mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    assert m[:] == data
            else:
                with pytest.raises(TypeError):
                    src.fileno()
        finally:
            src.close()
        src.close()  # twice is fine

    def test_source_reads_at_and_past_the_end(self, backend):
        backend.write("k", [payload(5000)], 5000)
        backend.write("empty", [], 0)
        src, empty = backend.open("k"), backend.open("empty")
        try:
            assert src.pread(10, 5000) == b"" and src.pread(10, 9000) == b"" and src.readinto(bytearray(8), 5000) == 0
            assert empty.pread(5, 0) == b"" and empty.readinto(bytearray(4), 0) == 0
        finally:
            src.close()
            empty.close()

    def test_an_open_source_survives_a_delete_or_fails_cleanly(self, backend):
        """After its object is deleted a source reads the old bytes (a file) or raises
        FileNotFoundError (an object store): never bytes of something else, never a hang."""
        backend.write("k", [b"0123456789"], 10)
        src = backend.open("k")
        try:
            backend.delete(["k"])
            try:
                got = src.pread(4, 6)
            except FileNotFoundError:
                return
            assert got == b"6789"
        finally:
            src.close()
