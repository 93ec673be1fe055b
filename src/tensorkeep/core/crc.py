"""CRC-32, the checksum of every tensorkeep header, tensor block and manifest."""

try:  # ISA-L computes the same CRC-32 as zlib, 4x faster, and releases the GIL
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - platforms without isal wheels
    from zlib import crc32

__all__ = ["crc32"]
