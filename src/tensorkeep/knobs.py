"""Tuning values in one place, so tests can shrink them to force the multi-chunk paths.

Change them at run time (``tensorkeep.knobs.BLOCK_BYTES = 4096``); code reads them
at call time, never at import.

Limits (``MAX_*``, see "Limits" in RELIABILITY.md) bound what a file may ask of a reader. A file
over one is refused with a ``FormatError`` naming the file, what it holds, the limit and the knob
to raise; ``save`` refuses (``ValueError``) to write a file over one, so tensorkeep never writes
what it will not read. Fixed, not knobs: a dimension is at most 2**62, and so is the product of a
tensor's non-zero dimensions times its item size (what torch and NumPy can index, even for an
empty tensor); a non-empty tensor's bytes must fit in the file, so no dimension exceeds the file
size; header JSON nested deeper than Python's recursion limit is refused (a valid header is 3
levels deep, a structure record at most ``MAX_DEPTH`` levels).
"""

#: Header size cap, as in safetensors (100 MB). Larger headers are refused unread; also the
#: largest DCP ``.metadata`` file and sharded-model index that are read.
MAX_HEADER_BYTES = 100_000_000
#: Most tensors one file may hold. Loading costs about 1.5 KB and 40 us per tensor (250,000 empty
#: tensors: ~0.4 GB over the interpreter, ~10 s on 2 cores); more are refused before the header is parsed.
MAX_TENSORS = 250_000
#: Most JSON values and object keys one header, or one tensorkeep structure record, may hold
#: (counted as the ',', ':', '[' and '{' outside strings, before json builds anything). Python
#: builds an object of up to ~200 bytes for each however short it is in the file, so this, not the
#: header size, bounds a header's memory (at most ~1 GB at the 100 MB cap, instead of ~4 GB).
#: 20 per tensor: enough for MAX_TENSORS tensors of up to 8 dimensions. Also the most pickle
#: opcodes, and the largest value counting shared parts at each use, in a DCP ``.metadata``
#: (about 70 opcodes per chunk: ~70,000 chunks by default; raise it for a larger DCP directory),
#: and of the values an unpickled ``.pt`` yields (shared containers counted at each use); twice it
#: bounds a ``.pt`` pickle's opcodes (about 30 per tensor).
MAX_JSON_VALUES = 5_000_000
#: Deepest nesting of a saved structure (dicts/lists/tuples inside each other), and of the values
#: in a DCP ``.metadata`` or a ``.pt`` file.
MAX_DEPTH = 100
#: Most dimensions a tensor may have.
MAX_NDIM = 64
#: Checksums cover blocks of this many bytes of each tensor, so a slice read verifies only what it reads.
BLOCK_BYTES = 4 << 20
#: Files whose tensors total less than this many bytes are assembled in memory and written with
#: one ``pwrite``: a checkpoint of a small model makes a few syscalls instead of one per tensor
#: (each one a trip through the GIL when the writer runs in the background). 0: never.
ONE_WRITE_BYTES = 1 << 20
#: Files smaller than this are written with plain buffered I/O.
DIRECT_IO_MIN_BYTES = 32 << 20
#: Size of each aligned staging buffer used by direct-I/O writes (two are kept), and so of each write:
#: on this project's VM disk 32 MB writes ran at 0.56-0.59 GB/s where 8 MB ones ran at 0.44-0.47
#: (1.5 GB saved, interleaved; BENCHMARKS.md).
CHUNK_BYTES = 32 << 20
#: Alignment of the data area (and of O_DIRECT buffers, offsets and lengths).
ALIGN = 4096
#: Threads for reading and checksumming in ``load``.
IO_THREADS = 2
#: ``load`` splits the work into tasks of about this many bytes (whole checksum blocks).
TASK_BYTES = 16 << 20
#: One tensor at least this large is read on IO_THREADS threads (``get``, ``read_into``).
SPLIT_READ_BYTES = 4 << 20
#: Reads are checksummed in pieces of this size while the piece is still in the CPU cache.
READ_PIECE_BYTES = 256 << 10
