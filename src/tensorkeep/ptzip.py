"""The CRC-32s of a ``torch.save`` file, checked while it is read: torch's own zip reader skips them.

A ``.pt`` file is a zip archive: ``data.pkl`` (the weights-only pickle), one entry per storage
(``data/0``, ``data/1``, ...) and a few small records, each stored with the CRC-32 of its bytes.
:func:`read_directory` parses the central directory with every count, size and offset checked
against the file (and the limits in :mod:`tensorkeep.knobs`) before anything is allocated;
:class:`CheckedFile` is what ``torch.load`` reads: each entry torch reads whole is checked in the
buffer torch just filled, so the file is read once; :meth:`CheckedFile.check_rest` checks what
torch did not read that way. A legacy (non-zip) torch file has no checksums: nothing is checked.

>>> import torch, tensorkeep.ptzip as ptzip
>>> torch.save({"w": torch.ones(2)}, "/tmp/tk-doc-ptzip.pt")
>>> with ptzip.CheckedFile("/tmp/tk-doc-ptzip.pt") as f:
...     w = torch.load(f, weights_only=True)["w"]
...     f.check_rest()
>>> w
tensor([1., 1.])
"""

from __future__ import annotations

import io
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable

from . import knobs
from .errors import ChecksumError, FormatError, LimitError
from .format import crc32

ZIP_MAGIC = b"PK\x03\x04"
_EOCD = struct.Struct("<4sHHHHIIH")  # end of central directory
_LOC64 = struct.Struct("<4sIQI")  # zip64 end of central directory locator
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")  # zip64 end of central directory
_CEN = struct.Struct("<4sHHHHHHIIIHHHHHII")  # central directory entry
_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # local header
_MAX_COMMENT = 0xFFFF
_FULL16, _FULL32 = 0xFFFF, 0xFFFFFFFF
#: Zip entries besides one per storage: data.pkl, version, byteorder, ... (torch writes 6 today).
_EXTRA_ENTRIES = 64


@dataclass(frozen=True)
class Entry:
    name: str
    crc: int
    size: int  # bytes, stored as they are (torch.save never compresses)
    data: int  # offset of the entry's bytes in the file


Pread = Callable[[int, int], Any]  # (n, at) -> up to n bytes at offset at


def _damaged(path: str, what: str) -> ChecksumError:
    return ChecksumError(f"{path}: the zip archive of this torch file is damaged: {what} "
                         "(or it was not written by torch.save). Fix: restore the file from a good copy.")


def read_directory(path: str, pread: Pread, size: int) -> list[Entry]:
    """Every entry of the zip archive ``path`` (``size`` bytes, read with ``pread``), validated.

    Raises :class:`ChecksumError` when the directory is inconsistent (a damaged file),
    :class:`LimitError` when it claims more than the knobs allow, :class:`FormatError` for
    zip features torch never writes (several disks, encryption, compression).
    """
    tail_at = max(0, size - _EOCD.size - _MAX_COMMENT)
    tail = bytes(pread(size - tail_at, tail_at))
    pos = tail.rfind(b"PK\x05\x06", 0, max(0, len(tail) - _EOCD.size + 4))
    if len(tail) != size - tail_at or pos < 0:
        raise _damaged(path, "no end-of-directory record (a truncated file?)")
    _, disk, cd_disk, n_disk, count, cd_size, cd_at, _ = _EOCD.unpack_from(tail, pos)
    end = tail_at + pos  # the directory ends before this
    loc = bytes(pread(_LOC64.size, end - _LOC64.size)) if end >= _LOC64.size else b""
    if len(loc) == _LOC64.size and loc[:4] == b"PK\x06\x07":  # zip64: torch writes it for every file
        _, _, at64, _ = _LOC64.unpack(loc)
        if at64 + _EOCD64.size > end - _LOC64.size:
            raise _damaged(path, f"zip64 directory record at {at64} lies outside the file")
        rec = bytes(pread(_EOCD64.size, at64))
        if len(rec) != _EOCD64.size or rec[:4] != b"PK\x06\x06":
            raise _damaged(path, f"no zip64 directory record at {at64}")
        _, _, _, _, disk, cd_disk, n_disk, count, cd_size, cd_at = _EOCD64.unpack(rec)
        end = at64
    elif _FULL16 in (n_disk, count) or _FULL32 in (cd_size, cd_at):
        raise _damaged(path, "the directory needs zip64 records that are missing")
    if disk or cd_disk:
        raise FormatError(f"{path}: a zip archive split over several disks; torch.save never writes one")
    if n_disk != count:
        raise _damaged(path, f"the directory counts {count} entries and {n_disk} on this disk")
    if cd_at + cd_size > end or count * _CEN.size > cd_size:
        raise _damaged(path, f"a directory of {count} entries in bytes {cd_at}..{cd_at + cd_size} does not fit")
    if count > knobs.MAX_TENSORS + _EXTRA_ENTRIES:
        raise LimitError(f"{path}: holds {count} zip entries (one per tensor storage), more than "
                         f"tensorkeep.knobs.MAX_TENSORS ({knobs.MAX_TENSORS}) allows; raise that knob to read it")
    if cd_size > knobs.MAX_HEADER_BYTES:
        raise LimitError(f"{path}: zip directory of {cd_size} bytes, more than tensorkeep.knobs.MAX_HEADER_BYTES "
                         f"({knobs.MAX_HEADER_BYTES}) allows; raise that knob to read it")
    cd = bytes(pread(cd_size, cd_at))
    if len(cd) != cd_size:
        raise _damaged(path, "the file is shorter than its directory says")
    entries, p = [], 0
    for _ in range(count):
        if p + _CEN.size > cd_size or cd[p : p + 4] != b"PK\x01\x02":
            raise _damaged(path, f"directory entry at {cd_at + p} is missing")
        (_, _, _, flags, method, _, _, crc, csize, usize, nlen, xlen, clen, _, _, _, off) = _CEN.unpack_from(cd, p)
        name_at, p = p + _CEN.size, p + _CEN.size + nlen + xlen + clen
        if p > cd_size:
            raise _damaged(path, f"directory entry at {cd_at + name_at - _CEN.size} runs past the directory")
        raw = cd[name_at : name_at + nlen]
        extra = cd[name_at + nlen : name_at + nlen + xlen]
        usize, csize, off = _zip64_values(path, raw.decode("utf-8", "replace"), extra, usize, csize, off)
        entries.append(_entry(path, pread, raw, flags, method, crc, csize, usize, off, cd_at))
    if p != cd_size:
        raise _damaged(path, f"the directory holds {cd_size - p} bytes more than its {count} entries")
    _check_disjoint(path, entries)
    return entries


def _zip64_values(path: str, name: str, extra: bytes, *vals: int) -> tuple[int, int, int]:
    """Sizes and offset, taking the ones saturated at 0xFFFFFFFF from the zip64 extra field."""
    out, i = list(vals), 0
    while i + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, i)
        if tag == 1:
            field = extra[i + 4 : i + 4 + n]
            k = 0
            for j, v in enumerate(out):
                if v == _FULL32:
                    if k + 8 > len(field):
                        raise _damaged(path, f"entry {name!r}: zip64 field too short")
                    out[j] = struct.unpack_from("<Q", field, k)[0]
                    k += 8
            return out[0], out[1], out[2]
        i += 4 + n
    if _FULL32 in out:
        raise _damaged(path, f"entry {name!r}: zip64 field missing")
    return out[0], out[1], out[2]


def _entry(path: str, pread: Pread, raw: bytes, flags: int, method: int, crc: int, csize: int, usize: int,
           off: int, cd_at: int) -> Entry:
    name = raw.decode("utf-8", "replace")
    if flags & 0x41:
        raise FormatError(f"{path}: zip entry {name!r} is encrypted; torch.save never encrypts")
    if method != 0:  # compressed: a few bytes could ask torch to allocate a thousand times more
        raise FormatError(f"{path}: zip entry {name!r} is compressed (method {method}); torch.save never "
                          "compresses, and tensorkeep reads only stored entries, so that a small file cannot "
                          "make it allocate far more than its size. Fix: if you trust the file, re-save it: "
                          "torch.save(torch.load(path, weights_only=True), path) (a stored entry's method is 0: if it was, the "
                          "file is damaged)")
    if off + _LOCAL.size + len(raw) > cd_at:
        raise _damaged(path, f"entry {name!r} starts at {off}, past the data area")
    head = bytes(pread(_LOCAL.size + len(raw), off))
    if len(head) != _LOCAL.size + len(raw) or head[:4] != ZIP_MAGIC or head[_LOCAL.size :] != raw:
        raise _damaged(path, f"entry {name!r}: no matching local header at {off}")
    nlen, xlen = _LOCAL.unpack_from(head)[9:]
    if nlen != len(raw):
        raise _damaged(path, f"entry {name!r}: its local header names {nlen} bytes, the directory {len(raw)}")
    data = off + _LOCAL.size + nlen + xlen  # where torch reads the bytes from
    if csize != usize:
        raise _damaged(path, f"entry {name!r} is stored as {csize} bytes but holds {usize}")
    if data + csize > cd_at:
        raise _damaged(path, f"entry {name!r}: {csize} bytes at {data} do not fit before the directory")
    return Entry(name, crc, csize, data)


def _check_disjoint(path: str, entries: list[Entry]) -> None:
    """Entries' bytes may not overlap, so checking them all reads each byte of the file at most once;
    names are unique, so a damaged name cannot make torch read one storage's bytes for another."""
    if len({e.name for e in entries}) != len(entries):
        raise _damaged(path, "two entries have the same name")
    prev: Entry | None = None
    for e in sorted(entries, key=lambda e: e.data):
        if prev is not None and e.data < prev.data + prev.size:
            raise _damaged(path, f"entries {prev.name!r} and {e.name!r} overlap")
        prev = e


def entry_crc(e: Entry, pread: Pread, path: str) -> int:
    """CRC-32 of the bytes of ``e``, read in pieces of ``knobs.READ_PIECE_BYTES``."""
    piece, crc = max(1, knobs.READ_PIECE_BYTES), 0
    for at in range(e.data, e.data + e.size, piece):
        data = pread(min(piece, e.data + e.size - at), at)
        if len(data) != min(piece, e.data + e.size - at):
            raise _damaged(path, f"entry {e.name!r}: the file ends inside it")
        crc = crc32(data, crc)
    return crc


def _mismatch(path: str, e: Entry, found: int) -> ChecksumError:
    return ChecksumError(
        f"{path}: zip entry {e.name!r} ({e.size} bytes at offset {e.data}) has CRC-32 {found:08x}, but the "
        f"archive stores {e.crc:08x}: the file is damaged (torch's own reader does not check this). "
        "Fix: restore the file from a good copy.")


def check_entries(path: str, entries: list[Entry], pread: Pread) -> None:
    """Raise :class:`ChecksumError` unless every entry matches its stored CRC-32."""
    for e in entries:
        found = entry_crc(e, pread, path)
        if found != e.crc:
            raise _mismatch(path, e, found)


def is_zip(path: str) -> bool:
    """True for a ``torch.save`` zip archive (it has CRC-32s), False for a legacy torch pickle."""
    with open(path, "rb") as f:
        return f.read(4) == ZIP_MAGIC


def check_buffer(path: str, buf: Any) -> None:
    """Check every CRC-32 of a torch file held in ``buf`` (bytes, a BytesIO's buffer, a mapping)."""
    with memoryview(buf) as mv, mv.cast("B") as b:
        if bytes(b[:4]) != ZIP_MAGIC:
            return  # a legacy torch file: no checksums
        pread: Pread = lambda n, at: b[at : at + n]  # noqa: E731 - no copies
        check_entries(path, read_directory(path, pread, len(b)), pread)


class CheckedFile(io.RawIOBase):
    """``path`` opened for ``torch.load``: each zip entry torch reads whole is checked on arrival.

    ``legacy`` is True for a non-zip torch file (nothing to check). After ``torch.load`` returns,
    call :meth:`check_rest`; ``check_all_mapped`` checks everything up front instead (for
    ``mmap=True`` loads, which read the file themselves).
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path, self.pos, self.fd = path, 0, -1
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.size = os.fstat(self.fd).st_size
            self.legacy = os.pread(self.fd, 4, 0) != ZIP_MAGIC
            self.entries = [] if self.legacy else read_directory(path, self._pread, self.size)
        except BaseException:
            self.close()
            raise
        self._by_data = {e.data: e for e in self.entries}
        self._done: set[int] = set()  # data offsets of the entries already checked
        self.bad: ChecksumError | None = None  # the first mismatch readinto saw

    def _pread(self, n: int, at: int) -> bytes:
        return os.pread(self.fd, n, at)

    # -- the file object torch reads (seek + readinto)
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos + (0, self.pos, self.size)[whence]
        return self.pos

    def readinto(self, b: Any) -> int:
        with memoryview(b) as mv, mv.cast("B") as out:
            n = os.preadv(self.fd, [out], self.pos) if self.pos < self.size else 0
            e = self._by_data.get(self.pos)
            if e is not None and n == e.size and e.data not in self._done:
                found = crc32(out[:n])  # still in the CPU cache, or at least in memory: no second read
                if found != e.crc and self.bad is None:
                    self.bad = _mismatch(self.path, e, found)  # raised by check_rest: torch mangles errors
                self._done.add(e.data)
        self.pos += n
        return n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        super().close()

    # -- checks
    def check_rest(self) -> None:
        """Raise what :meth:`readinto` found; check the entries torch did not read whole through it."""
        if self.bad is not None:
            raise self.bad
        check_entries(self.path, [e for e in self.entries if e.data not in self._done], self._pread)

    def check_all_mapped(self) -> None:
        """Check every entry through a read-only mapping (the pages a ``mmap=True`` load then maps)."""
        if self.entries and self.size:
            mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
            try:
                with memoryview(mm) as mv:
                    check_entries(self.path, self.entries, lambda n, at: mv[at : at + n])
            finally:
                try:
                    mm.close()
                except BufferError:  # a view still held by an error's traceback: unmapped when it goes
                    pass
        self._done.update(e.data for e in self.entries)
