"""What a table of contents checks of a stored file before reading it: its size and first bytes."""

from __future__ import annotations

from tensorkeep.core.format import CRC_FIELD_END, check_stored
from tensorkeep.errors import FormatError
from tensorkeep.storage import Backend

__all__ = ["check", "look"]


def look(backend: Backend, key: str) -> tuple[int, bytes] | None:
    """``key``'s size and its first :data:`~tensorkeep.core.format.CRC_FIELD_END` bytes; None when it is
    missing. A local entry that is not a regular file (a FIFO, a directory) is a :class:`FormatError`,
    never opened: a FIFO would block the read forever."""
    if not backend.exists(key):
        if backend.local:
            import os

            if os.path.lexists(backend.path(key)):
                raise FormatError(f"{backend.path(key)} is not a regular file")
        return None
    src = backend.open(key)
    try:
        return src.size, src.pread(CRC_FIELD_END, 0)
    finally:
        src.close()


def check(backend: Backend, key: str, want: dict, where: str, name: str | None = None) -> None:
    """:func:`~tensorkeep.core.format.check_stored` of ``key`` in ``backend``."""
    check_stored(where, name or key, look(backend, key), want)
