"""The CRC-32s of a ``torch.save`` file, checked while it is read: torch's own zip reader skips them.

A ``.pt`` file is a zip archive: ``data.pkl`` (the weights-only pickle), one entry per storage
(``data/0``, ``data/1``, ...) and a few small records, each stored with the CRC-32 of its bytes.
:func:`read_directory` parses the central directory with every count, size and offset checked
against the file (and the limits in :mod:`tensorkeep.knobs`) before anything is allocated;
:class:`CheckedFile` is what ``torch.load`` reads: each entry torch reads whole is checked in the
buffer torch just filled, so the file is read once; :meth:`CheckedFile.check_rest` checks what
torch did not read that way. A legacy (non-zip) torch file has no checksums: nothing is checked.
:func:`check_pickle` scans the pickle before torch runs it (see there); :func:`open_regular` opens
only regular files (a FIFO would block ``open`` forever).

>>> import torch, tensorkeep.core.ptzip as ptzip
>>> torch.save({"w": torch.ones(2)}, "/tmp/tk-doc-ptzip.pt")
>>> with ptzip.CheckedFile("/tmp/tk-doc-ptzip.pt") as f:
...     w = torch.load(f, weights_only=True)["w"]
...     f.check_rest()
>>> w
tensor([1., 1.])
"""

from __future__ import annotations

import _compat_pickle
import codecs
import io
import mmap
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Callable

from tensorkeep import knobs
from tensorkeep.errors import ChecksumError, FormatError, LimitError
from tensorkeep.core.format import crc32

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
    return ChecksumError(f"{path}: the zip archive of this torch file is damaged: {what} "
                         "(or it was not written by torch.save). Fix: restore the file from a good copy.")


def open_regular(path: str) -> int:
    """A read-only descriptor of ``path``, which must be a regular file: a FIFO is refused
    (:class:`FormatError`) instead of blocking ``open`` until some writer comes, forever.

    >>> os.close(open_regular(__file__))
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # O_NONBLOCK: no wait on a FIFO
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError(f"{path}: not a regular file (a FIFO, a device or a directory); tensorkeep reads "
                              "tensors only from regular files")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


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


def _entry(path: str, pread: Pread, raw: bytes, flags: int, method: int, crc: int, csize: int, usize: int,
           off: int, cd_at: int, deflated_ok: bool) -> Entry:
    name = raw.decode("utf-8", "replace")
    if flags & 0x41:
        raise FormatError(f"{path}: zip entry {name!r} is encrypted; torch.save never encrypts")
    if method != 0 and not (deflated_ok and method == 8):  # a few bytes could ask torch to allocate far more
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
        "Fix: restore the file from a good copy.")


def check_entries(path: str, entries: list[Entry], pread: Pread) -> None:
    """Raise :class:`ChecksumError` unless every entry matches its stored CRC-32."""
    for e in entries:
        found = entry_crc(e, pread, path)
        if found != e.crc:
            raise _mismatch(path, e, found)


def is_zip(path: str) -> bool:
    """True for a ``torch.save`` zip archive (it has CRC-32s), False for a legacy torch pickle."""
    fd = open_regular(path)
    try:
        return os.pread(fd, 4, 0) == ZIP_MAGIC
    finally:
        os.close(fd)


def check_buffer(path: str, buf: Any, *, crcs: bool = True) -> None:
    """Check a torch file held in ``buf`` (bytes, a BytesIO's buffer, a mapping) before torch reads it:
    its zip directory, its pickle (:func:`check_pickle`) and, with ``crcs``, every CRC-32 (without,
    compressed entries are accepted, as ``verify=False`` loads trust the file)."""
    with memoryview(buf) as mv, mv.cast("B") as b:
        if bytes(b[:4]) != ZIP_MAGIC:  # a legacy torch file: no checksums
            check_legacy_pickles(path, bytes(b))
            return
        pread: Pread = lambda n, at: b[at : at + n]  # noqa: E731 - no copies
        entries = read_directory(path, pread, len(b), deflated_ok=not crcs)
        check_zip_pickle(path, entries, pread)
        if crcs:
            check_entries(path, entries, pread)


# ------------------------------------------------------------------ the pickle, before torch runs it

_KEY, _OTHER, _DICT = "key", "other", "dict"  # a safe dict key (small int, bool, None); anything else; a dict
_ARG = {0x4A: 4, 0x4B: 1, 0x4D: 2, 0x47: 8, 0x80: 1}  # BININT, BININT1, BININT2, BINFLOAT, PROTO: fixed arguments
_HASHING = {"builtins.set", "collections.Counter", "collections.OrderedDict"}  # called with items, they hash them
_FROM_TYPE = "torch._tensor._rebuild_from_type_v2"  # calls its first argument with its third
_BYTES = ("r", "_codecs.encode")  # what that call returns: how protocol 2 writes bytes, _codecs.encode(str, "latin1")
_DICTS = {_DICT, ("r", "collections.OrderedDict"), ("r", "collections.Counter")}  # keys checked as they were set
_TAKES = {"_codecs.encode": "a string and 'latin1' (another encoding would import its codec's module)",
          "builtins.bytearray": "bytes, or a string and 'latin-1' (a number would be allocated as that many bytes)",
          "torch.serialization._get_layout": "a layout's name (it is looked up in a dict)"}
_MAX_KEY_INT = (1 << 61) - 2  # ints up to this hash to themselves (but -1, to -2: one pair, harmless)
codecs.lookup("latin1")  # now, not when a file's bytes are first decoded: a file never causes an import


def _is_key(v: Any) -> bool:
    """A value whose hash the file cannot choose: a str or bytes (hashes are salted), a small int, a bool, None."""
    return v is _KEY or v == _BYTES or (type(v) is tuple and v[0] == "s")


def _safe_items(v: Any) -> bool:
    """``v``'s items are safe to hash: a dict's keys (checked as it was filled), a list or tuple of keys."""
    if type(v) is list:
        return v[1]
    if type(v) is tuple and v[0] == "t":
        return all(_is_key(x) for x in v[1])
    return v in _DICTS  # what is left is hashable: a constant, ("g" | "r" | "s", text)


def _updatable(v: Any) -> bool:
    """``dict.update(v)``, or of each part of a tuple ``v``, would hash only safe keys (what BUILD does)."""
    if type(v) is list:
        return v[1]
    if type(v) is not tuple or v[0] != "t":
        return True
    return all(x[1] if type(x) is list else not (type(x) is tuple and x[0] == "t" and x[1] and not _is_key(x[1][0]))
               for x in v[1])


def _is_str(v: Any, text: str | None = None) -> bool:
    return type(v) is tuple and v[0] == "s" and (text is None or v[1] == text)


def _call(where: str, func: Any, args: Any) -> None:
    """Refuse a call that would hash values whose hash the file controls (set, Counter, OrderedDict of
    items), or look up a codec (a module import) or allocate by a number from the file (bytearray)."""
    name = func[1] if type(func) is tuple and func[0] == "g" else None
    items = args[1] if type(args) is tuple and args[0] == "t" else None
    while name == _FROM_TYPE and items is not None and len(items) >= 3:
        func, args = items[0], items[2]  # _rebuild_from_type_v2(func, type, args, state) calls func(*args)
        name = func[1] if type(func) is tuple and func[0] == "g" else None
        items = args[1] if type(args) is tuple and args[0] == "t" else None
    if name is not None and name.startswith("torch.") and name.endswith(("Tensor", "Storage")):
        raise FormatError(f"{where}: the pickle calls {name} itself, which allocates whatever size the file asks "
                          "for; torch.save never does (its tensors are rebuilt from the archive's storages)")
    if name in _HASHING and not (items is not None and (not items or (len(items) == 1 and _safe_items(items[0])))):
        raise FormatError(f"{where}: the pickle builds a {name} of tuples, floats or other values whose hash the "
                          "file controls (a few bytes can make hashing them take hours or crash); tensorkeep reads "
                          "sets and dicts keyed by str, int, bool and None only")
    if name == "_codecs.encode":
        ok = items is not None and len(items) == 2 and _is_str(items[0]) and _is_str(items[1], "latin1")
    elif name == "torch.serialization._get_layout":  # looks its argument up in a dict
        ok = items is not None and len(items) == 1 and _is_str(items[0])
    elif name == "builtins.bytearray":
        ok = items is not None and (items in ((), (_BYTES,)) or (
            len(items) == 2 and _is_str(items[0]) and _is_str(items[1], "latin-1")))
    else:
        return
    if not ok:
        raise FormatError(f"{where}: the pickle calls {name} with arguments torch.save never writes; it takes "
                          f"{_TAKES[name]}")


def _key(where: str, k: Any) -> None:
    if not _is_key(k):
        raise FormatError(f"{where}: the pickle has a dict key that is not a str, an int, a bool or None (a "
                          "tuple, a float, a huge int: a few bytes of such keys can make hashing them take hours "
                          "or crash); tensorkeep reads dicts keyed by those only")


def check_pickle(where: str, data: Any, at: int = 0) -> int:
    r"""Scan the pickle at ``at`` in ``data`` (bytes or a mapping) as torch's weights-only unpickler
    would run it, and refuse (:class:`FormatError`) what would make that unpickler hash values whose
    hash the file controls: a dict key or set item that is a tuple (a tuple nested 200,000 deep
    crashes ``hash``; one shared 2**100 ways hashes for ever), a float or a huge int (keys that all
    collide make inserting them quadratic); encode with a codec other than the one torch.save uses
    (looking one up imports a module); make a bytearray of a size the file gives; or run an opcode
    that unpickler does not run. Returns where the pickle ends. Nothing is built or called; at most
    2 * ``knobs.MAX_JSON_VALUES`` opcodes are read (a .pt file has about 30 per tensor).

    >>> check_pickle("x.pkl", b"\x80\x02}X\x01\x00\x00\x00wK\x01s.")
    13
    """
    stack: list[Any] = []
    marks: list[list[Any]] = []
    memo: dict[int, Any] = {}
    pos, budget = at, 2 * knobs.MAX_JSON_VALUES
    try:
        while True:
            op = data[pos]
            pos += 1
            budget -= 1
            if budget < 0:  # each opcode makes an object here (and in torch): bound the memory
                raise LimitError(f"{where}: the pickle has more than {2 * knobs.MAX_JSON_VALUES} opcodes (about 30 "
                                 "per tensor); raise tensorkeep.knobs.MAX_JSON_VALUES to read it")
            if op in (0x71, 0x72, 0x68, 0x6A):  # BINPUT, LONG_BINPUT, BINGET, LONG_BINGET
                w = 1 if op in (0x71, 0x68) else 4
                i = int.from_bytes(data[pos : pos + w], "little")
                pos += w
                if op < 0x70:
                    stack.append(memo[i])
                else:
                    memo[i] = stack[-1]
            elif op in (0x58, 0x55):  # BINUNICODE, SHORT_BINSTRING: ("s", the text if short)
                w = 4 if op == 0x58 else 1
                n = int.from_bytes(data[pos : pos + w], "little")
                text = bytes(data[pos + w : pos + w + n]).decode("utf-8", "replace") if n <= 16 else None
                pos += w + n
                stack.append(("s", text))
            elif op in _ARG:
                pos += _ARG[op]
                if op != 0x80:
                    stack.append(_OTHER if op == 0x47 else _KEY)
            elif op == 0x8A:  # LONG1
                n = data[pos]
                v = int.from_bytes(data[pos + 1 : pos + 1 + n], "little", signed=True)
                pos += 1 + n
                stack.append(_KEY if abs(v) <= _MAX_KEY_INT else _OTHER)
            elif op in (0x4E, 0x88, 0x89):  # NONE, NEWTRUE, NEWFALSE
                stack.append(_KEY)
            elif op == 0x28:  # MARK
                marks.append(stack)
                stack = []
            elif op in (0x74, 0x65, 0x75):  # TUPLE, APPENDS, SETITEMS: the items since the mark
                items, stack = stack, marks.pop()
                if op == 0x74:
                    stack.append(("t", tuple(items)))
                elif op == 0x65:
                    if type(stack[-1]) is list:
                        stack[-1][1] = stack[-1][1] and all(_is_key(x) for x in items)
                else:
                    for k in items[::2]:
                        _key(where, k)
            elif op in (0x85, 0x86, 0x87):  # TUPLE1, TUPLE2, TUPLE3
                n = op - 0x84
                items = stack[-n:]
                if len(items) != n:
                    raise IndexError
                del stack[-n:]
                stack.append(("t", tuple(items)))
            elif op == 0x29:  # EMPTY_TUPLE
                stack.append(("t", ()))
            elif op == 0x5D:  # EMPTY_LIST: [tag, whether every item is a safe key]
                stack.append(["l", True])
            elif op in (0x7D, 0x8F):  # EMPTY_DICT, EMPTY_SET (never filled: no ADDITEMS)
                stack.append(_DICT if op == 0x7D else _OTHER)
            elif op == 0x61:  # APPEND
                item = stack.pop()
                if type(stack[-1]) is list:
                    stack[-1][1] = stack[-1][1] and _is_key(item)
            elif op == 0x73:  # SETITEM
                stack.pop()
                _key(where, stack.pop())
            elif op == 0x63:  # GLOBAL: module and name, a line each
                e1 = data.find(b"\n", pos)
                e2 = data.find(b"\n", e1 + 1)
                if e1 < 0 or e2 < 0:
                    raise IndexError
                module, name = bytes(data[pos:e1]).decode("utf-8", "replace"), bytes(data[e1 + 1 : e2]).decode(
                    "utf-8", "replace")
                pos = e2 + 1
                if (module, name) in _compat_pickle.NAME_MAPPING:  # as torch maps protocol 2's names
                    module, name = _compat_pickle.NAME_MAPPING[(module, name)]
                else:
                    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
                stack.append(("g", f"{module}.{name}"))
            elif op in (0x52, 0x81):  # REDUCE, NEWOBJ (cls.__new__ only: it fills nothing)
                args = stack.pop()
                func = stack.pop()
                _call(where, func, args if op == 0x52 else ("t", ()))  # NEWOBJ: cls.__new__ fills nothing
                stack.append(("r", func[1]) if op == 0x52 and type(func) is tuple and func[0] == "g" else _OTHER)
            elif op == 0x62:  # BUILD: dict.update of the object under it with the state (a dict, or pairs)
                if not _updatable(stack.pop()) or not stack:
                    raise FormatError(f"{where}: the pickle sets an object's state from pairs whose keys are not "
                                      "str, int, bool or None")
            elif op == 0x51:  # BINPERSID: torch looks up a storage by the key in its id, ("storage", type, key, ...)
                pid = stack.pop()
                ids = pid[1] if type(pid) is tuple and pid[0] == "t" else ()
                view = ids[5][1] if len(ids) > 5 and type(ids[5]) is tuple and ids[5][0] == "t" else ()
                if (len(ids) > 2 and not _is_key(ids[2])) or (view and not _is_key(view[0])):
                    raise FormatError(f"{where}: the pickle names a storage by a key that is not a str or an int")
                stack.append(_OTHER)
            elif op == 0x2E:  # STOP
                return pos
            else:
                raise FormatError(f"{where}: the pickle has opcode {op:#04x} at byte {pos - 1 - at}, which "
                                  "torch's weights-only loader does not run (torch.save never writes it)")
    except (IndexError, KeyError):
        raise FormatError(f"{where}: the pickle is malformed near byte {pos - at} (the file is damaged, or was "
                          "not written by torch.save)") from None


def check_zip_pickle(path: str, entries: list[Entry], pread: Pread) -> None:
    """:func:`check_pickle` on the ``data.pkl`` of a zip archive's ``entries``, before torch reads it."""
    for e in entries:
        if e.name.rsplit("/", 1)[-1] != "data.pkl":
            continue
        if e.size > knobs.MAX_HEADER_BYTES:
            raise LimitError(f"{path}: its pickle {e.name!r} is {e.size} bytes, more than tensorkeep.knobs."
                             f"MAX_HEADER_BYTES ({knobs.MAX_HEADER_BYTES}) allows; raise that knob to read it")
        data = bytes(pread(e.size, e.data))
        if len(data) != e.size:
            raise _damaged(path, f"entry {e.name!r}: the file ends inside it")
        if e.deflated:
            try:
                data = zlib.decompressobj(-15).decompress(data, knobs.MAX_HEADER_BYTES + 1)
            except zlib.error:
                raise _damaged(path, f"entry {e.name!r} does not inflate") from None
            if len(data) > knobs.MAX_HEADER_BYTES:
                raise LimitError(f"{path}: its pickle {e.name!r} inflates to more than tensorkeep.knobs."
                                 f"MAX_HEADER_BYTES ({knobs.MAX_HEADER_BYTES}) bytes; raise that knob to read it")
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


class CheckedFile(io.RawIOBase):
    """``path`` opened for ``torch.load``: each zip entry torch reads whole is checked on arrival.

    ``legacy`` is True for a non-zip torch file (nothing to check). After ``torch.load`` returns,
    call :meth:`check_rest`; ``check_all_mapped`` checks everything up front instead (for
    ``mmap=True`` loads, which read the file themselves). ``deflated_ok``: compressed entries are
    accepted, for ``verify=False`` loads (torch reads the path itself; only the pickle is checked).
    """

    def __init__(self, path: str, *, deflated_ok: bool = False) -> None:
        super().__init__()
        self.path, self.pos, self.fd = path, 0, -1
        self.fd = open_regular(path)
        try:
            self.size = os.fstat(self.fd).st_size
            self.legacy = os.pread(self.fd, 4, 0) != ZIP_MAGIC
            self.entries = [] if self.legacy else read_directory(path, self._pread, self.size, deflated_ok=deflated_ok)
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
    def check_pickle(self) -> None:
        """Scan the pickle(s) torch will run (:func:`check_pickle`), before it runs them."""
        if not self.legacy:
            check_zip_pickle(self.path, self.entries, self._pread)
        elif self.size:
            mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
            try:
                check_legacy_pickles(self.path, mm)
            finally:
                mm.close()

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
