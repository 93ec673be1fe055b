"""The file format: safetensors bytes, validated strictly. Knows bytes and dtype names, not torch.

Layout (little endian)::

    u64 N | N bytes of UTF-8 JSON header, space padded | data area

The header maps each tensor name to ``{"dtype", "shape", "data_offsets"}`` (offsets
relative to the data area, back to back, covering it exactly) and may hold
``"__metadata__"``, a str -> str map. tensorkeep files put their header checksum
first in that map and their structure and tensor checksums under ``"tensorkeep"``.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from tensorkeep import knobs
from tensorkeep.core.crc import crc32 as crc32
from tensorkeep.core.crc import crc32_combine as crc32_combine
from tensorkeep.core.jsontext import SEAL_PREFIX as SEAL_PREFIX
from tensorkeep.core.jsontext import bit_distance
from tensorkeep.core.jsontext import check_json_values as check_json_values
from tensorkeep.core.jsontext import dumps as dumps
from tensorkeep.core.jsontext import json_values as json_values
from tensorkeep.core.jsontext import seal as seal
from tensorkeep.core.jsontext import strict_json as strict_json
from tensorkeep.core.jsontext import unseal as unseal
from tensorkeep.errors import ChecksumError, FormatError, LimitError

#: safetensors dtype name -> bytes per element.
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

#: Version of the structure and checksum record tensorkeep keeps under ``__metadata__["tensorkeep"]``.
FORMAT_VERSION = 1
TK_KEY = "tensorkeep"
CRC_KEY = "tensorkeep.crc32"
#: Every tensorkeep header starts with these bytes; the 8 hex digits after them are
#: the CRC-32 of the length prefix and header with those digits set to "00000000".
TK_PREFIX = b'{"__metadata__":{"' + CRC_KEY.encode() + b'":"'
CRC_PLACEHOLDER = "00000000"
_MAX_DIM = 1 << 62


class TensorInfo(NamedTuple):
    """One tensor of a header (a tuple: a header of thousands of tensors is parsed on every open)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets relative to the data area
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]  # in file order (by offset)
    metadata: dict[str, str] | None
    data_start: int  # absolute offset of the data area
    is_tensorkeep: bool


def check_tensor_count(n: int, path: str) -> None:
    if n > knobs.MAX_TENSORS:
        raise LimitError(
            f"{path}: header lists {n} tensors, more than the limit of {knobs.MAX_TENSORS} "
            "(tensorkeep.knobs.MAX_TENSORS; raise it to read this file)"
        )


def looks_like_tensorkeep(head: bytes) -> bool:
    """True if the first bytes of a file are those of a tensorkeep file, up to one flipped bit.

    A shorter ``head`` (a truncated file, even an empty one) is judged by the bytes it has."""
    got = head[8 : 8 + len(TK_PREFIX)]
    if len(got) < len(TK_PREFIX):
        high = head[4:8]  # a tensorkeep header is shorter than 4 GiB: the length's high bytes are zero
        return bit_distance(high + got, bytes(len(high)) + TK_PREFIX[: len(got)]) <= 1
    return bit_distance(got, TK_PREFIX) <= 1


def header_crc(prefix_and_header: bytes | bytearray) -> int:
    """CRC-32 of the length prefix + header, with the stored checksum digits zeroed."""
    start = 8 + len(TK_PREFIX)
    b = bytearray(prefix_and_header)
    b[start : start + 8] = CRC_PLACEHOLDER.encode()
    return crc32(b)


#: Bytes from the start of a tensorkeep file through its stored header checksum.
CRC_FIELD_END = 8 + len(TK_PREFIX) + 8


def crc_field(head: bytes | bytearray) -> str:
    """The header checksum a tensorkeep file records about itself (8 hex digits, unverified), from
    its first :data:`CRC_FIELD_END` bytes: a cheap identity that manifests keep for each file."""
    return bytes(head[CRC_FIELD_END - 8 : CRC_FIELD_END]).decode("ascii", "replace")


def check_stored(where: str, name: str, found: tuple[int, bytes] | None, want: Mapping[str, Any]) -> None:
    """The one rule every table of contents (a checkpoint's manifest, a run's packs, ``distributed.json``)
    applies to the files it lists: ``name`` exists, with the size recorded in ``want`` and, when one is
    recorded, the header checksum it carries (its first :data:`CRC_FIELD_END` bytes are in ``found``).
    This is the cheap check, a few bytes per file; loading verifies every byte.

    >>> check_stored("run/step_1", "model.tk", None, {"size": 10})
    Traceback (most recent call last):
    tensorkeep.errors.FormatError: run/step_1: model.tk is missing
    """
    if found is None:
        raise FormatError(f"{where}: {name} is missing")
    size, head = found
    if size != want["size"]:
        raise FormatError(
            f"{where}: {name} is {size} bytes, the manifest says {want['size']}: it is not the file this "
            "checkpoint wrote (truncated, replaced or damaged)"
        )
    crc = want.get("crc32")
    if isinstance(crc, str) and crc_field(head) != crc:
        raise FormatError(
            f"{where}: {name} has header checksum {crc_field(head)!r}, the manifest says {crc!r}: it is "
            "not the file this checkpoint wrote (replaced or damaged)"
        )


def stored_crc(path: str) -> str:
    """:func:`crc_field` of a local file."""
    with open(path, "rb") as f:
        return crc_field(f.read(CRC_FIELD_END))


def encode_header(
    tensors: list[tuple[str, str, tuple[int, ...]]],
    metadata: dict[str, str] | None,
    align: int = 8,
) -> tuple[bytes, list[tuple[int, int]]]:
    """Encode ``[(name, dtype, shape), ...]`` (in data order) into ``prefix + header``.

    The header is space padded so that the data area starts at a multiple of ``align``.
    Returns the bytes and each tensor's ``(begin, end)`` offsets.

    >>> b, offs = encode_header([("x", "F32", (2,))], None)
    >>> offs, len(b) % 8
    ([(0, 8)], 0)
    """
    obj: dict[str, Any] = {}
    if metadata is not None:
        obj["__metadata__"] = metadata
    offsets = []
    pos = 0
    for name, dtype, shape in tensors:
        n = DTYPE_SIZES[dtype]
        for d in shape:
            n *= d
        offsets.append((pos, pos + n))
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    text = dumps(obj).encode("utf-8")
    total = 8 + len(text)
    text += b" " * ((-total) % align)
    _refuse_unreadable(text, len(tensors), (metadata or {}).get(TK_KEY))
    return struct.pack("<Q", len(text)) + text, offsets


def _refuse_unreadable(header: bytes, ntensors: int, record: str | None) -> None:
    """tensorkeep never writes a file that its readers would refuse under the current limits."""
    checks = [
        ("tensors", ntensors, knobs.MAX_TENSORS, "MAX_TENSORS"),
        ("header bytes", len(header), knobs.MAX_HEADER_BYTES, "MAX_HEADER_BYTES"),
        ("JSON values in its header", json_values(header), knobs.MAX_JSON_VALUES, "MAX_JSON_VALUES"),
    ]
    if record is not None:
        checks.append(
            (
                "JSON values in its structure record",
                json_values(record.encode("utf-8", "surrogatepass")),
                knobs.MAX_JSON_VALUES,
                "MAX_JSON_VALUES",
            )
        )
    for what, n, limit, knob in checks:
        if n > limit:
            raise ValueError(
                f"cannot save: the file would have {n} {what}, more than the limit of {limit} that loading "
                f"enforces (tensorkeep.knobs.{knob}; raise it both where the file is saved and where it is loaded)"
            )


def _check_int(v: Any, what: str, path: str, lo: int = 0, hi: int = _MAX_DIM) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise FormatError(f"{path}: {what} must be an integer in [{lo}, {hi}], found {v!r}")
    return v


def _check_str(s: Any, what: str, path: str) -> str:
    if type(s) is not str:
        raise FormatError(f"{path}: {what} must be a string, found {type(s).__name__}")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"{path}: {what} {s!r} is not valid UTF-8 (lone surrogate)") from None
    return s


_FIELDS = {"dtype", "shape", "data_offsets"}


def _tensor_info(name: str, v: Any, path: str) -> TensorInfo:
    # The common case is checked with cheap type tests; messages are built only on failure.
    if type(v) is dict and len(v) == 3 and v.keys() == _FIELDS:
        dtype, shape, offs = v["dtype"], v["shape"], v["data_offsets"]
        if (
            type(dtype) is str
            and dtype in DTYPE_SIZES
            and type(shape) is list
            and len(shape) <= knobs.MAX_NDIM
            and type(offs) is list
            and len(offs) == 2
        ):
            numel = span = DTYPE_SIZES[dtype]
            for d in shape:
                if type(d) is not int or not 0 <= d <= _MAX_DIM:
                    break
                numel *= d
                span *= d or 1
            else:
                b, e = offs
                if (
                    type(b) is int
                    and type(e) is int
                    and 0 <= b <= e <= _MAX_DIM
                    and numel == e - b
                    and span <= _MAX_DIM
                ):
                    return TensorInfo(name, dtype, tuple(shape), b, e)
    return _tensor_info_slow(name, v, path)


def _tensor_info_slow(name: str, v: Any, path: str) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(v, dict):
        raise FormatError(f"{where}: expected an object with dtype, shape, data_offsets, found {type(v).__name__}")
    if set(v) != _FIELDS:
        raise FormatError(f"{where}: expected exactly the fields dtype, shape, data_offsets, found {sorted(v)}")
    dtype = v["dtype"]
    if type(dtype) is not str or dtype not in DTYPE_SIZES:
        raise FormatError(f"{where}: unknown dtype {dtype!r}; known: {', '.join(DTYPE_SIZES)}")
    shape = v["shape"]
    if type(shape) is not list or len(shape) > knobs.MAX_NDIM:
        raise FormatError(f"{where}: shape must be a list of at most {knobs.MAX_NDIM} integers, found {shape!r:.80}")
    shape = tuple(_check_int(d, "every dimension", where) for d in shape)
    offs = v["data_offsets"]
    if type(offs) is not list or len(offs) != 2:
        raise FormatError(f"{where}: data_offsets must be [begin, end], found {offs!r:.80}")
    begin, end = (_check_int(o, "data_offsets", where) for o in offs)
    if begin > end:
        raise FormatError(f"{where}: data_offsets are reversed ({begin} > {end})")
    numel = 1
    for d in shape:
        numel *= d
    if numel * DTYPE_SIZES[dtype] != end - begin:
        raise FormatError(
            f"{where}: shape {list(shape)} of {dtype} needs {numel * DTYPE_SIZES[dtype]} bytes, "
            f"but data_offsets [{begin}, {end}] hold {end - begin}"
        )
    span = DTYPE_SIZES[dtype]
    for d in shape:
        span *= d or 1
    if span > _MAX_DIM:  # only an empty tensor gets here: torch and NumPy still compute its strides
        raise FormatError(
            f"{where}: shape {list(shape)} is too large even for an empty tensor: its non-zero dimensions "
            f"times the item size make {span} bytes, more than 2**62"
        )
    return TensorInfo(name, dtype, shape, begin, end)


def parse_header(head: bytes, file_size: int, path: str) -> Header:
    """Validate ``prefix + header`` bytes of a file of ``file_size`` bytes.

    ``head`` must hold at least the 8-byte prefix and the whole header (see
    :func:`header_length`). Raises :class:`FormatError` naming the problem.
    """
    n = header_length(head[:8], file_size, path)
    raw = head[8 : 8 + n]
    # cheap counts before json builds anything: every tensor has a "data_offsets" key
    check_tensor_count(raw.count(b'"data_offsets"'), path)
    check_json_values(raw, f"{path}: header")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: header is not UTF-8 ({e})") from None
    if not text.startswith("{"):
        raise FormatError(f"{path}: header must be a JSON object starting with '{{', found {text[:20]!r}")
    obj = strict_json(text, f"{path}: header")
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: header must be a JSON object")
    if "\\u" in text:  # only escapes can smuggle in lone surrogates; raw bytes were checked by decode()
        for key in obj:
            _check_str(key, "tensor name", path)
    metadata = None
    infos = []
    for key, v in obj.items():
        if key == "__metadata__":
            if type(v) is not dict:
                raise FormatError(f"{path}: __metadata__ must be an object of strings, found {type(v).__name__}")
            for mk, mv in v.items():
                if type(mv) is not str:
                    raise FormatError(
                        f"{path}: __metadata__ value of {mk!r} must be a string, found {type(mv).__name__}"
                    )
            if "\\u" in text:
                for mk, mv in v.items():
                    _check_str(mk, "metadata key", path)
                    _check_str(mv, f"metadata value of {mk!r}", path)
            metadata = v
        else:
            infos.append(_tensor_info(key, v, path))
    check_tensor_count(len(infos), path)  # exact: a key spelled with escapes escaped the count above
    infos.sort(key=lambda t: (t.begin, t.end))
    pos = 0
    for t in infos:
        if t.begin != pos:
            kind = "overlaps the previous tensor" if t.begin < pos else f"leaves a hole of {t.begin - pos} bytes"
            raise FormatError(f"{path}: tensor {t.name!r} at data_offsets [{t.begin}, {t.end}] {kind}")
        pos = t.end
    data_len = file_size - 8 - n
    if pos != data_len:
        if pos > data_len:
            raise FormatError(
                f"{path}: file is truncated: the header describes {pos} data bytes, the file has {data_len}"
            )
        raise FormatError(f"{path}: {data_len - pos} trailing bytes after the last tensor")
    is_tk = head[8 : 8 + len(TK_PREFIX)] == TK_PREFIX and metadata is not None and TK_KEY in metadata
    if is_tk and metadata is not None:
        stored = metadata.get(CRC_KEY, "")
        if header_crc(head[: 8 + n]) != _hex(stored, path):
            raise ChecksumError(f"{path}: header checksum mismatch: the file is damaged")
    return Header({t.name: t for t in infos}, metadata, 8 + n, is_tk)


def header_length(prefix: bytes, file_size: int, path: str) -> int:
    """Read and bound the u64 header length at the start of a file."""
    if len(prefix) < 8 or file_size < 8:
        raise FormatError(f"{path}: file is {file_size} bytes; a safetensors file starts with an 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > knobs.MAX_HEADER_BYTES:
        raise FormatError(f"{path}: header length {n} exceeds the cap of {knobs.MAX_HEADER_BYTES} bytes")
    if 8 + n > file_size:
        raise FormatError(f"{path}: header length {n} runs past the end of the file ({file_size} bytes)")
    if n < 2:
        raise FormatError(f"{path}: header length {n} is too small for a JSON object")
    return n


def _hex(s: Any, path: str) -> int:
    # exactly 8 lowercase digits: int(s, 16) alone would also take "A" for "a" (one flipped bit), "+", "_"
    if type(s) is not str or len(s) != 8 or not _HEX.fullmatch(s):
        raise FormatError(f"{path}: checksum must be 8 lowercase hex digits, found {s!r:.40}")
    return int(s, 16)


_HEX = re.compile(r"[0-9a-f]*")


def parse_checksums(v: Any, block: Any, header: Header, path: str) -> Mapping[str, list[int]]:
    """Validate the per-tensor block checksums stored in a tensorkeep header."""
    block = _check_int(block, "checksum block size", path, lo=1)
    if type(v) is not dict or v.keys() != header.tensors.keys():
        raise FormatError(f"{path}: checksum table does not list exactly the file's tensors")
    total = 0
    for name, crcs in v.items():
        nblocks = max(1, -(-header.tensors[name].nbytes // block))
        if type(crcs) is not list or len(crcs) != nblocks:
            raise FormatError(f"{path}: tensor {name!r}: expected {nblocks} block checksums")
        total += nblocks
    try:  # the common case in one pass: every checksum 8 lowercase hex digits (and none holds a comma)
        joined = ",".join(map(",".join, v.values()))
        ok = not v or (_CRC_LIST.fullmatch(joined) is not None and joined.count(",") == total - 1)
    except TypeError:  # a checksum that is not a string
        ok = False
    if not ok:
        for name, crcs in v.items():
            for c in crcs:
                if type(c) is not str or len(c) != 8 or not _HEX.fullmatch(c):
                    raise FormatError(
                        f"{path}: tensor {name!r}: checksum must be 8 lowercase hex digits, found {c!r:.40}"
                    )
    return _Checksums(v)


_CRC_LIST = re.compile(r"(?:[0-9a-f]{8},)*[0-9a-f]{8}")


class _Checksums(Mapping):
    """name -> block checksums as ints, converted from the validated hex digits on first use
    (a file opened to read one tensor does not convert them all)."""

    def __init__(self, hexes: dict[str, list[str]]) -> None:
        self._hex: dict[str, list[str]] = hexes
        self._int: dict[str, list[int]] = {}

    def __getitem__(self, name: str) -> list[int]:
        got = self._int.get(name)
        if got is None:
            got = self._int[name] = [int(c, 16) for c in self._hex[name]]
        return got

    def __iter__(self) -> Iterator[str]:
        return iter(self._hex)

    def __len__(self) -> int:
        return len(self._hex)
