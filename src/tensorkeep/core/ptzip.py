"""The CRC-32s of a ``torch.save`` file: torch's own zip reader skips them.

A ``.pt`` file is a zip archive: ``data.pkl`` (the weights-only pickle), one entry per storage
(``data/0``, ``data/1``, ...) and a few small records, each stored with the CRC-32 of its bytes.
:func:`read_directory` parses the central directory with every count, size and offset checked
against the file (and the limits in :mod:`tensorkeep.knobs`) before anything is allocated;
:func:`check_entries` checks the CRC-32s; :func:`check_zip_pickle` scans the pickle before torch
runs it (:mod:`tensorkeep.core.picklescan`). Everything here reads through a ``pread(n, at)``
function: no file is opened (see :mod:`tensorkeep.file.torchfile`, which torch reads through).
A legacy (non-zip) torch file has no checksums.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tensorkeep import knobs
from tensorkeep.core.format import crc32
from tensorkeep.core.picklescan import check_pickle
from tensorkeep.errors import ChecksumError, FormatError, LimitError

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
    size: int  # bytes in the file, stored as they are (torch.save never compresses)
    data: int  # offset of the entry's bytes in the file
    deflated: bool = False  # compressed: only read by verify=False loads, which trust the file's sizes


Pread = Callable[[int, int], Any]  # (n, at) -> up to n bytes at offset at


def _damaged(path: str, what: str) -> ChecksumError:
    return ChecksumError(
        f"{path}: the zip archive of this torch file is damaged: {what} "
        "(or it was not written by torch.save). Fix: restore the file from a good copy."
    )


def read_directory(path: str, pread: Pread, size: int, *, deflated_ok: bool = False) -> list[Entry]:
    """Every entry of the zip archive ``path`` (``size`` bytes, read with ``pread``), validated.

    Raises :class:`ChecksumError` when the directory is inconsistent (a damaged file),
    :class:`LimitError` when it claims more than the knobs allow, :class:`FormatError` for
    zip features torch never writes (several disks, encryption, compression unless ``deflated_ok``).
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
        raise LimitError(
            f"{path}: holds {count} zip entries (one per tensor storage), more than "
            f"tensorkeep.knobs.MAX_TENSORS ({knobs.MAX_TENSORS}) allows; raise that knob to read it"
        )
    if cd_size > knobs.MAX_HEADER_BYTES:
        raise LimitError(
            f"{path}: zip directory of {cd_size} bytes, more than tensorkeep.knobs.MAX_HEADER_BYTES "
            f"({knobs.MAX_HEADER_BYTES}) allows; raise that knob to read it"
        )
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
        entries.append(_entry(path, pread, raw, flags, method, crc, csize, usize, off, cd_at, deflated_ok))
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


def _entry(
    path: str,
    pread: Pread,
    raw: bytes,
    flags: int,
    method: int,
    crc: int,
    csize: int,
    usize: int,
    off: int,
    cd_at: int,
    deflated_ok: bool,
) -> Entry:
    name = raw.decode("utf-8", "replace")
    if flags & 0x41:
        raise FormatError(f"{path}: zip entry {name!r} is encrypted; torch.save never encrypts")
    if method != 0 and not (deflated_ok and method == 8):  # a few bytes could ask torch to allocate far more
        raise FormatError(
            f"{path}: zip entry {name!r} is compressed (method {method}); torch.save never "
            "compresses, and tensorkeep reads only stored entries, so that a small file cannot "
            "make it allocate far more than its size. Fix: if you trust the file, re-save it: "
            "torch.save(torch.load(path, weights_only=True), path) (a stored entry's method is 0: if it was, the "
            "file is damaged)"
        )
    if off + _LOCAL.size + len(raw) > cd_at:
        raise _damaged(path, f"entry {name!r} starts at {off}, past the data area")
    head = bytes(pread(_LOCAL.size + len(raw), off))
    if len(head) != _LOCAL.size + len(raw) or head[:4] != ZIP_MAGIC or head[_LOCAL.size :] != raw:
        raise _damaged(path, f"entry {name!r}: no matching local header at {off}")
    nlen, xlen = _LOCAL.unpack_from(head)[9:]
    if nlen != len(raw):
        raise _damaged(path, f"entry {name!r}: its local header names {nlen} bytes, the directory {len(raw)}")
    data = off + _LOCAL.size + nlen + xlen  # where torch reads the bytes from
    if csize != usize and method == 0:
        raise _damaged(path, f"entry {name!r} is stored as {csize} bytes but holds {usize}")
    if data + csize > cd_at:
        raise _damaged(path, f"entry {name!r}: {csize} bytes at {data} do not fit before the directory")
    return Entry(name, crc, csize, data, method == 8)


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
        "Fix: restore the file from a good copy."
    )


def check_entries(path: str, entries: list[Entry], pread: Pread) -> None:
    """Raise :class:`ChecksumError` unless every entry matches its stored CRC-32."""
    for e in entries:
        found = entry_crc(e, pread, path)
        if found != e.crc:
            raise _mismatch(path, e, found)


def check_buffer(path: str, buf: Any, *, crcs: bool = True) -> None:
    """Check a torch file held in ``buf`` (bytes, a BytesIO's buffer, a mapping) before torch reads it:
    its zip directory, its pickle (:func:`check_pickle`) and, with ``crcs``, every CRC-32 (without,
    compressed entries are accepted, as ``verify=False`` loads trust the file)."""
    with memoryview(buf) as mv, mv.cast("B") as b:
        if bytes(b[:4]) != ZIP_MAGIC:  # a legacy torch file: no checksums
            check_legacy_pickles(path, bytes(b))
            return
        pread: Pread = lambda n, at: b[at : at + n]
        entries = read_directory(path, pread, len(b), deflated_ok=not crcs)
        check_zip_pickle(path, entries, pread)
        if crcs:
            check_entries(path, entries, pread)


def check_zip_pickle(path: str, entries: list[Entry], pread: Pread) -> None:
    """:func:`check_pickle` on the ``data.pkl`` of a zip archive's ``entries``, before torch reads it."""
    for e in entries:
        if e.name.rsplit("/", 1)[-1] != "data.pkl":
            continue
        if e.size > knobs.MAX_HEADER_BYTES:
            raise LimitError(
                f"{path}: its pickle {e.name!r} is {e.size} bytes, more than tensorkeep.knobs."
                f"MAX_HEADER_BYTES ({knobs.MAX_HEADER_BYTES}) allows; raise that knob to read it"
            )
        data = bytes(pread(e.size, e.data))
        if len(data) != e.size:
            raise _damaged(path, f"entry {e.name!r}: the file ends inside it")
        if e.deflated:
            try:
                data = zlib.decompressobj(-15).decompress(data, knobs.MAX_HEADER_BYTES + 1)
            except zlib.error:
                raise _damaged(path, f"entry {e.name!r} does not inflate") from None
            if len(data) > knobs.MAX_HEADER_BYTES:
                raise LimitError(
                    f"{path}: its pickle {e.name!r} inflates to more than tensorkeep.knobs."
                    f"MAX_HEADER_BYTES ({knobs.MAX_HEADER_BYTES}) bytes; raise that knob to read it"
                )
        try:
            check_pickle(f"{path}: {e.name}", data)
        except FormatError:
            if crc32(data) != e.crc:  # damage explains a refusal better
                raise _mismatch(path, e, crc32(data)) from None
            raise


def check_legacy_pickles(path: str, data: Any) -> None:
    """:func:`check_pickle` on the pickles a legacy torch file starts with (magic number, protocol,
    system info, the object), before torch reads them."""
    at = 0
    for _ in range(4):
        at = check_pickle(path, data, at)
