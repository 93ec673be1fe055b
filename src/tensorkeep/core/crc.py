"""CRC-32, the checksum of every tensorkeep header, tensor block and manifest.

``crc32_combine(a, b, len_b)`` is the CRC-32 of two byte strings joined, from theirs: it lets
threads checksum parts of one block. It is None where ISA-L is missing (then blocks stay whole).
"""

from collections.abc import Callable

crc32_combine: Callable[[int, int, int], int] | None
try:  # ISA-L computes the same CRC-32 as zlib, 4x faster, and releases the GIL
    from isal.isal_zlib import crc32, crc32_combine
except ImportError:  # pragma: no cover - platforms without isal wheels
    from zlib import crc32

    crc32_combine = None

__all__ = ["crc32", "crc32_combine"]
