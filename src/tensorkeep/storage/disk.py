"""The local backend: keys are files below a directory on this machine.

Every mutation goes through :mod:`tensorkeep.storage.local` (temp file, fsync, rename, directory
fsync), so writes are atomic and durable, and the crash simulator sees them all.

>>> import tempfile; d = DiskBackend(tempfile.mkdtemp())
>>> d.write("a/b.bin", [b"hello ", b"world"], 11)
>>> d.read_range("a/b.bin", 6, 11), d.list("a/")
(b'world', {'a/b.bin': 11})
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterable
from typing import Any

from tensorkeep.errors import SaveError
from tensorkeep.storage import local as _io
from tensorkeep.storage.base import check_key


class DiskSource:
    """A regular file opened for reading (a FIFO or a device is refused, not waited on)."""

    mappable = True

    def __init__(self, path: str) -> None:
        self.name = path
        self.fd = _io.open_regular(path)
        self.opened_ns = time.time_ns()  # before the fstat: see tensorkeep.file.headers
        st = os.fstat(self.fd)
        self.size = st.st_size
        self.identity: tuple[int, ...] | None = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def reidentify(self) -> tuple[int, ...]:
        """:attr:`identity` now (a file changed since it was opened has another)."""
        st = os.fstat(self.fd)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def pread(self, n: int, at: int) -> bytes:
        return os.pread(self.fd, n, at)

    def readinto(self, buf: Any, at: int) -> int:
        mv, done = memoryview(buf).cast("B"), 0
        while done < len(mv):
            n = os.preadv(self.fd, [mv[done:]], at + done)
            if n <= 0:
                break
            done += n
        return done

    def fileno(self) -> int:
        return self.fd

    def whole(self) -> Any:
        return self.name

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DiskBackend:
    """A directory, read and written by key (``a/b.tk`` is the file ``<root>/a/b.tk``)."""

    local = True

    def __init__(self, root: str) -> None:
        self.url = self.root = os.path.abspath(root)

    def path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(self.root, key).split("/"))

    def open(self, key: str) -> DiskSource:
        return DiskSource(self.path(key))

    def read_range(self, key: str, start: int, end: int) -> bytes:
        if start < 0:
            raise ValueError(f"{self.path(key)}: a range cannot start at {start}")
        if end <= start:
            return b""
        src = self.open(key)
        try:
            return src.pread(max(0, min(end, src.size) - start), start)
        finally:
            src.close()

    def read(self, key: str) -> bytes:
        src = self.open(key)
        try:
            return src.pread(src.size, 0)
        finally:
            src.close()

    def size(self, key: str) -> int:
        st = os.stat(self.path(key))
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(f"{self.path(key)}: not a regular file")
        return st.st_size

    def exists(self, key: str) -> bool:
        return _io.is_regular_file(self.path(key)) or (
            os.path.islink(self.path(key)) and os.path.isfile(self.path(key))
        )

    def list(self, prefix: str = "") -> dict[str, int]:
        out: dict[str, int] = {}
        for dirpath, _dirnames, filenames in os.walk(self.root):  # symlinked directories are not followed
            rel = os.path.relpath(dirpath, self.root)
            for f in filenames:
                key = f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}"
                p = os.path.join(dirpath, f)
                if key.startswith(prefix) and _io.temp_of(f) is None and _io.is_regular_file(p):
                    out[key] = os.path.getsize(p)
        return out

    def write(self, key: str, chunks: Iterable[Any], size: int, *, durable: bool = True) -> None:
        path = self.path(key)
        try:
            _io.makedirs(os.path.dirname(path), durable)
        except OSError as e:
            raise SaveError(
                e.errno,
                f"could not save {path}: creating its directory failed: {e}. The previous file, if any, is untouched",
            ) from e
        with _io.atomic_file(path, durable=durable) as fd:
            at = 0
            for c in chunks:
                mv = memoryview(c).cast("B")
                _io.pwrite_all(fd, mv, at)
                at += len(mv)

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            p = self.path(key)
            if _io.is_regular_file(p):
                _io.unlink(p)
