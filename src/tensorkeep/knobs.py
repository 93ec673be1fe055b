"""Tuning values in one place, so tests can shrink them to force the multi-chunk paths.

Change them at run time (``tensorkeep.knobs.BLOCK_BYTES = 4096``); code reads them
at call time, never at import.
"""

#: Header size cap, as in safetensors (100 MB). Larger headers are refused unread.
MAX_HEADER_BYTES = 100_000_000
#: Deepest nesting of a saved structure (dicts/lists/tuples inside each other).
MAX_DEPTH = 100
#: Most dimensions a tensor may have.
MAX_NDIM = 64
#: Checksums cover blocks of this many bytes of each tensor, so a slice read verifies only what it reads.
BLOCK_BYTES = 4 << 20
#: Files smaller than this are written with plain buffered I/O.
DIRECT_IO_MIN_BYTES = 32 << 20
#: Size of each aligned staging buffer used by direct-I/O writes.
CHUNK_BYTES = 8 << 20
#: Alignment of the data area (and of O_DIRECT buffers, offsets and lengths).
ALIGN = 4096
#: Threads for reading and checksumming in ``load``.
IO_THREADS = 2
#: ``load`` splits the work into tasks of about this many bytes (whole checksum blocks).
TASK_BYTES = 16 << 20
#: Reads are checksummed in pieces of this size while the piece is still in the CPU cache.
READ_PIECE_BYTES = 256 << 10
