"""save / load / open on one file: verified and lazy reads (the write side is :mod:`tensorkeep.file.writer`)."""

from __future__ import annotations

import mmap
import os
from bisect import bisect_right
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import torch

from tensorkeep import knobs, threads
from tensorkeep.core.dtypes import numpy_dtype, torch_dtype
from tensorkeep.core.format import (
    DTYPE_SIZES,
    TK_PREFIX,
    TensorInfo,
    crc32,
    crc32_combine,
    header_length,
    looks_like_tensorkeep,
    parse_header,
)
from tensorkeep.core.record import Record, parse_record
from tensorkeep.core.tree import unflatten
from tensorkeep.errors import ChecksumError, FormatError, LimitError
from tensorkeep.file import headers, workers
from tensorkeep.file.audit import audited
from tensorkeep.file.torchfile import load_torch_file
from tensorkeep.storage import Source, open_source
from tensorkeep.storage.objects import PART_BYTES, THREADS

# ----------------------------------------------------------------------------- read


class _Reader:
    """An open tensorkeep or safetensors file: validated header, tensor reads, verification."""

    @audited
    def __init__(self, src: Source, cached: bool = True) -> None:
        self.src, self.path, self.size = src, src.name, src.size
        self._map: mmap.mmap | None = None  # made by the first map_one; tensors over it keep it alive
        identity = getattr(src, "identity", None) if cached else None
        hit = headers.get(identity) if identity is not None else None
        if hit is not None:  # the same unchanged file was opened before: its header is parsed and checked
            self.torch_pickle = False
            self.header, record = hit
            self._use(record)
            return
        try:
            self._open(src.pread)
        except BaseException:
            src.close()
            raise
        if identity is not None and not self.torch_pickle and self.header.is_tensorkeep:
            now = getattr(src, "reidentify", lambda: None)()
            headers.put(identity, src.opened_ns, now, self.header.data_start, (self.header, self.record))  # type: ignore[attr-defined]

    def _open(self, pread: Callable[[int, int], bytes]) -> None:
        """Tell a torch pickle from a safetensors file and validate the header, reading with ``pread(n, at)``."""
        first = pread(8 + len(TK_PREFIX), 0)
        # a safetensors header length is followed by '{'; only files that do not look like that may be pickles
        st_like = first[8:9] == b"{" or looks_like_tensorkeep(first)
        self.torch_pickle = not st_like and (
            first[:4] == b"PK\x03\x04" or (first[:1] == b"\x80" and first[1:2] in b"\x02\x03\x04\x05")
        )
        if self.torch_pickle:
            return
        try:
            n = header_length(first, self.size, self.path)
            self.header = parse_header(first[:8] + pread(n, 8), self.size, self.path)
            self._parse_tk()
            if not self.header.is_tensorkeep and looks_like_tensorkeep(first):
                # damage to the first bytes and to the "tensorkeep" key must not make it a plain, unchecked file
                raise FormatError(f"{self.path}: header starts like a tensorkeep header but is not one")
        except FormatError as e:
            if looks_like_tensorkeep(first) and not isinstance(e, (ChecksumError, LimitError)):
                raise ChecksumError(f"{e} (the file is a damaged tensorkeep file)") from None
            raise

    def _parse_tk(self) -> None:
        self._use(parse_record(self.header, self.path))

    def _use(self, rec: Record) -> None:
        self.record = rec
        self.crcs, self.block, self.tree, self.kinds = rec.crcs, rec.block, rec.tree, rec.kinds
        self.metadata = dict(rec.metadata)  # the caller's copy: the record may be shared through the cache

    def close(self) -> None:
        self._map = None  # not closed: tensors over it may outlive the reader
        self.src.close()

    # -- verification
    def check(self, name: str, buf: Any, first_block: int = 0) -> None:
        """Verify ``buf``: the bytes of ``name`` starting at block ``first_block`` (a large one on
        the reader's threads)."""
        if self.crcs is None:
            return
        mv = memoryview(buf).cast("B") if not isinstance(buf, np.ndarray) else memoryview(buf)  # type: ignore[arg-type]
        self._check_segments(name, self._segments_split(name, mv, first_block * self.block, fill=False))

    # -- reads
    def _empty(self, t: TensorInfo, kind: str, rows: int | None = None) -> tuple[Any, np.ndarray]:
        shape = t.shape if rows is None else (rows, *t.shape[1:])
        if kind == "n":
            arr = np.empty(shape, numpy_dtype(t.dtype))
            return arr, arr.reshape(-1).view(np.uint8)
        x = torch.empty(shape, dtype=torch_dtype(t.dtype))
        return x, x.reshape(-1).view(torch.uint8).numpy()

    def read_range(self, buf: Any, offset: int) -> None:
        n = self.src.readinto(buf, offset)
        if n != len(memoryview(buf).cast("B")):
            raise ChecksumError(
                f"{self.path}: file is truncated (reading {len(memoryview(buf).cast('B'))} bytes "
                f"at byte {offset} gave {n})"
            )

    def read_verified(self, name: str, buf: np.ndarray, first_block: int, verify: bool) -> None:
        """Read ``buf`` (whole checksum blocks of ``name`` from ``first_block`` on) and verify it."""
        if not verify or self.crcs is None:
            t = self.header.tensors[name]
            return self.read_range(buf, self.header.data_start + t.begin + first_block * self.block)
        self._check_segments(name, self._segments(name, buf, first_block * self.block))

    def _segments(self, name: str, buf: Any, at: int, fill: bool = True) -> list[tuple[int, int, int]]:
        """Checksum ``buf``, the bytes of ``name`` from byte ``at`` on, reading them first (``fill``):
        in pieces, each checksummed while it is still in the CPU cache, so that verifying costs
        little on top of the copy. Returns (block, CRC-32, length) of each block's part."""
        base = self.header.data_start + self.header.tensors[name].begin + at
        piece, block = knobs.READ_PIECE_BYTES, self.block
        mv = memoryview(buf)
        n, p, out = len(mv), 0, []
        if n == 0:
            return [(at // block, 0, 0)]
        while p < n:
            start, end, crc = p, min(n, ((at + p) // block + 1) * block - at), 0
            while p < end:
                q = min(p + piece, end)
                if fill:
                    self.read_range(mv[p:q], base + p)
                crc = crc32(mv[p:q], crc)
                p = q
            out.append(((at + start) // block, crc, end - start))
        return out

    def _segments_split(self, name: str, mv: memoryview, at: int, fill: bool) -> list[tuple[int, int, int]]:
        """:meth:`_segments` of a large ``mv`` in equal parts on the reader's threads, so that copying,
        page faults and checksums use every core (the parts of a block are joined by ``crc32_combine``)."""
        n, piece = len(mv), knobs.READ_PIECE_BYTES
        if n < knobs.SPLIT_READ_BYTES or knobs.IO_THREADS < 2 or crc32_combine is None:
            return self._segments(name, mv, at, fill)
        part = -(-n // knobs.IO_THREADS // piece) * piece
        parts = workers.run_all(
            [partial(self._segments, name, mv[p : p + part], at + p, fill) for p in range(0, n, part)]
        )
        return [seg for segs in parts for seg in segs]

    def _check_segments(self, name: str, segments: list[tuple[int, int, int]]) -> None:
        """Compare the checksums of whole blocks, joined from the parts in ``segments`` (in order)."""
        joined: list[list[int]] = []  # [block, crc]
        for blk, crc, length in segments:
            if joined and joined[-1][0] == blk:
                assert crc32_combine is not None  # parts of one block come only from split reads
                joined[-1][1] = crc32_combine(joined[-1][1], crc, length)
            else:
                joined.append([blk, crc])
        want = self.crcs[name] if self.crcs is not None else []
        for blk, crc in joined:
            if crc != want[blk]:
                raise ChecksumError(
                    f"{self.path}: tensor {name!r} is damaged (checksum of bytes {blk * self.block}.. "
                    f"is {crc:08x}, stored {want[blk]:08x}). The file changed after it was written "
                    "(disk, copy or transfer error); use a backup or an earlier checkpoint"
                )

    @audited
    def read(self, name: str, kind: str, verify: bool) -> Any:
        """One tensor into new memory; a large one on the reader's threads (:meth:`read_split`)."""
        x, buf = self._empty(self.header.tensors[name], kind)
        self.read_split(name, buf, verify)
        return x

    def read_split(self, name: str, buf: np.ndarray, verify: bool) -> None:
        """Fill ``buf`` with all of tensor ``name`` (verified). A large tensor is read in equal
        parts on the reader's threads, so copying, page faults and checksums use every core; the
        checksums of the parts of a block are joined (``crc32_combine``) and checked whole."""
        n, threads = len(buf), knobs.IO_THREADS
        checked = verify and self.crcs is not None
        if n < knobs.SPLIT_READ_BYTES or threads < 2 or not self.src.mappable or (checked and not crc32_combine):
            return self.read_verified(name, buf, 0, verify)
        if not checked:
            start, part = self.header.data_start + self.header.tensors[name].begin, -(-n // threads)
            workers.run_all([partial(self.read_range, buf[at : at + part], start + at) for at in range(0, n, part)])
            return
        self._check_segments(name, self._segments_split(name, memoryview(buf), 0, fill=True))  # type: ignore[arg-type]

    @audited
    def read_all(self, verify: bool) -> dict[str, Any]:
        """Read every tensor; work is split into checksum-block-aligned tasks over IO_THREADS threads.
        An object (not a local file) is fetched in large ranges instead (:func:`_read_ranges`)."""
        if not self.src.mappable:
            return _read_ranges(self, verify)
        out, tasks = {}, []
        span = max(1, knobs.TASK_BYTES // self.block) * self.block if self.block else knobs.TASK_BYTES
        for name, t in self.header.tensors.items():
            x, buf = self._empty(t, self.kinds[name])
            out[name] = x
            for at in range(0, max(t.nbytes, 1), span):
                tasks.append((name, buf[at : at + span], at))
        workers.run_all([partial(self._read_task, task, verify) for task in tasks])
        return out

    def _read_task(self, task: tuple, verify: bool) -> None:
        name, buf, at = task  # ``at``: byte offset of ``buf`` in the tensor, a multiple of the block size
        if self.crcs is not None:
            self.read_verified(name, buf, at // self.block, verify)
        else:  # plain safetensors: no checksum blocks
            self.read_range(buf, self.header.data_start + self.header.tensors[name].begin + at)

    @audited
    def map_all(self, verify: bool) -> dict[str, Any]:
        if not self.src.mappable:
            return self.read_all(verify)  # an object cannot be mapped: read it
        return {name: self.map_one(name, self.kinds[name], verify) for name in self.header.tensors}

    @audited
    def map_one(self, name: str, kind: str, verify: bool) -> Any:
        """Tensor ``name`` over a copy-on-write mapping of the file (one mapping per reader):
        nothing is copied, writes to it stay in this process; checked through the mapping.
        An object (not a local file) cannot be mapped: it is read."""
        if not self.src.mappable:
            return self.read(name, kind, verify)
        if self._map is None:
            mm = mmap.mmap(self.src.fileno(), 0, access=mmap.ACCESS_COPY)
            if len(mm) != self.size:
                raise ChecksumError(f"{self.path}: file changed size while being opened")
            self._map = mm
        mm, t = self._map, self.header.tensors[name]
        start = self.header.data_start + t.begin
        if verify:
            with memoryview(mm) as mv:
                self.check(name, mv[start : start + t.nbytes])
        numel = t.nbytes // DTYPE_SIZES[t.dtype]
        if kind == "n":
            return np.frombuffer(mm, numpy_dtype(t.dtype), numel, start).reshape(t.shape)
        if numel == 0:
            return torch.empty(t.shape, dtype=torch_dtype(t.dtype))
        return torch.frombuffer(mm, dtype=torch_dtype(t.dtype), count=numel, offset=start).reshape(t.shape)

    @audited
    def build(self, arrays: dict[str, Any], device: Any) -> Any:
        if device is not None:
            arrays = {n: (a.to(device) if isinstance(a, torch.Tensor) else a) for n, a in arrays.items()}
        if not self.header.is_tensorkeep:  # a plain safetensors file (a tensorkeep tree may be None itself)
            return arrays

        def get(name: str, kind: str) -> Any:
            if kind != self.kinds[name]:
                raise FormatError(
                    f"{self.path}: stored structure refers to {name!r} as a torch tensor and as a NumPy array"
                )
            return arrays[name]

        return unflatten(self.tree, get, self.path)


def open_reader(path: str | os.PathLike[str], *, cached: bool = True) -> _Reader:
    """The file or object ``path``, its header read and validated (or, with ``cached``, taken
    from :mod:`tensorkeep.file.headers` when the same unchanged file was opened before)."""
    return _Reader(open_source(path), cached)


def read_file(path: str | os.PathLike[str], *, device: Any = None, lazy: bool = False, verify: bool = True) -> Any:
    """One file or object, as :func:`tensorkeep.load` returns it (a tensorkeep, safetensors or torch file)."""
    r = open_reader(path)
    try:
        if r.torch_pickle:
            return load_torch_file(
                r.path, device, lazy and r.src.mappable, r.src.whole() if not r.src.mappable else None, verify=verify
            )
        arrays = r.map_all(verify) if lazy else r.read_all(verify)
        return r.build(arrays, device)
    finally:
        r.close()


def _read_ranges(r: _Reader, verify: bool) -> dict[str, Any]:
    """Every tensor of an object: the data area in PART_BYTES ranges read in parallel (small tensors
    share a request), then every checksum."""
    out, bufs = {}, {}
    for name, t in r.header.tensors.items():
        out[name], buf = r._empty(t, r.kinds[name])
        bufs[name] = memoryview(buf).cast("B")  # type: ignore[arg-type]  # numpy's stubs: __buffer__ on Python >= 3.12
    order = sorted(r.header.tensors.values(), key=lambda t: t.begin)
    begins = [t.begin for t in order]
    total, span, start = order[-1].end if order else 0, PART_BYTES, r.header.data_start

    def fetch(at: int) -> None:
        n = min(span, total - at)
        data = memoryview(bytearray(n))
        if r.src.readinto(data, start + at) != n:
            raise ChecksumError(f"{r.path}: object is truncated (bytes {start + at}..{start + at + n} of {r.size})")
        i = max(0, bisect_right(begins, at) - 1)
        while i < len(order) and order[i].begin < at + n:
            t = order[i]
            lo, hi = max(t.begin, at), min(t.end, at + n)
            if hi > lo:
                bufs[t.name][lo - t.begin : hi - t.begin] = data[lo - at : hi - at]
            i += 1

    with ThreadPoolExecutor(THREADS, thread_name_prefix="tk-get") as pool:
        threads.map(pool, fetch, range(0, total, span))
        if verify and r.crcs is not None:
            threads.map(pool, lambda name: r.check(name, bufs[name]), bufs)
    return out
