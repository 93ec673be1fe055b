"""What every storage backend offers: the narrow interface the layers above use.

A :class:`Backend` is one place bytes live — a directory on this machine, or a prefix of an
object store — addressed by ``/``-separated keys. It reads ranges, writes whole objects (each
appears complete or not at all), lists and deletes. A :class:`Source` is one key opened for
reading. Capabilities, not types, tell the callers what more a backend can do: ``local`` backends
keep their keys as files, so they can be mapped, written in place with ``O_DIRECT`` and published
by rename (``path``). The same conformance tests (``tests/storage``) run on every backend.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol


def check_key(where: str, key: str) -> str:
    """``key`` if it names something below a root: not empty, not absolute, no ``.``/``..``/empty parts, no NUL."""
    if not key or "\x00" in key or any(p in ("", ".", "..") for p in key.split("/")):
        raise ValueError(f"{where}: {key!r} is not a key below this directory")
    return key


class Source(Protocol):
    """One stored file or object, open for reading."""

    name: str  #: its path or URL, for messages
    size: int
    mappable: bool  #: ``fileno()`` can be mapped (a local file)
    #: what changes whenever the bytes may have: (device, inode, size, mtime, ctime) of a local
    #: file, None where there is no such thing (an object). Parsed headers are cached by it.
    identity: tuple[int, ...] | None

    def pread(self, n: int, at: int) -> bytes:
        """Up to ``n`` bytes at offset ``at`` (fewer only at the end)."""

    def readinto(self, buf: Any, at: int) -> int:
        """Fill ``buf`` from offset ``at``; returns the bytes read (less than ``len(buf)`` only at the end)."""

    def fileno(self) -> int:
        """A descriptor to map; only when ``mappable``."""

    def whole(self) -> Any:
        """The bytes as something ``torch.load`` reads: a path, or a file object."""

    def close(self) -> None: ...


class Backend(Protocol):
    """One directory or object-store prefix, read and written by key."""

    url: str  #: what messages name
    local: bool  #: keys are files on this machine (see :meth:`path`)

    def path(self, key: str) -> str:
        """The file of ``key`` (local backends only)."""

    def open(self, key: str) -> Source:
        """Open ``key`` for reading; :class:`FileNotFoundError` if it does not exist."""

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``key`` (fewer if it is shorter)."""

    def read(self, key: str) -> bytes: ...

    def size(self, key: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> dict[str, int]:
        """``{key: size}`` of every object (regular file) whose key starts with ``prefix``."""

    def write(self, key: str, chunks: Iterable[Any], size: int, *, durable: bool = True) -> None:
        """Write ``key`` whole from buffers holding ``size`` bytes: it appears complete or not at all,
        and the previous version stays readable until then (:class:`SaveError` on failure)."""

    def delete(self, keys: Iterable[str]) -> None:
        """Delete these keys (missing ones are fine); never anything else."""
