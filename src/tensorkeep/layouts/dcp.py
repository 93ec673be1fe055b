"""Convert a torch DCP (``torch.distributed.checkpoint``) directory into one tensorkeep file.

DCP's ``.metadata`` is a pickle (protocol 4) of a few dataclasses; torch's weights-only unpickler
cannot read it and ``pickle`` would run whatever the file names. :func:`read_metadata` is a small
opcode reader: it knows the opcodes DCP emits and the classes and functions its metadata uses
(``_CLASSES``, ``_CALLS``, dtypes from a fixed table), builds plain :class:`Obj` records, imports and
calls nothing. What a file can make it build is bounded (opcodes, and every value's size counting
shared parts each time, by ``knobs.MAX_JSON_VALUES``; nesting by ``knobs.MAX_DEPTH``; strings; the
file by ``knobs.MAX_HEADER_BYTES``); dict keys are names and records only (no tuples or ints a file
could make collide), and nothing changes once inside another value (no cycles).

:func:`convert_dcp` checks everything before it allocates a tensor: chunks tile each tensor exactly,
each has one storage entry, every byte range lies in a real data file and shares no byte with
another, so what it allocates is backed by data on disk. The ``.distcp`` files hold a
``torch.save`` blob per chunk and per non-tensor value (read with ``torch.load(weights_only=True)``)
or, in DCP's safetensors format, the raw bytes.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tensorkeep import knobs
from tensorkeep.core import ptzip
from tensorkeep.core.boxes import check_cover
from tensorkeep.core.boxes import volume as _volume
from tensorkeep.core.dtypes import name_of_torch, torch_dtype_named
from tensorkeep.core.tree import check_nesting
from tensorkeep.errors import FormatError, LimitError
from tensorkeep.file.writer import save
from tensorkeep.storage import local as _io

_MD = "torch.distributed.checkpoint.metadata"
_CLASSES = {
    (_MD, n)
    for n in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
    )
}
_CLASSES.add(("torch.distributed.checkpoint.filesystem", "_StorageInfo"))
_MAX_TEXT = 1 << 20  # longest string (DCP's are names and paths)
_MAX_DIM = 1 << 62


@dataclass(eq=False)
class Obj:
    """An instance of one of DCP's metadata classes, as data: its class name and pickled state."""

    cls: str
    state: Any = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        return self.state.get(name, default) if isinstance(self.state, dict) else default


@dataclass(frozen=True)
class _Global:
    module: str
    name: str


def _only(*types: type) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if type(value) not in types:
            raise ValueError(f"needs a {' or '.join(t.__name__ for t in types)}, got a {_what(value)}")
        return value

    return check


def _size(dims: Any = ()) -> tuple:
    if any(type(d) is not int for d in _only(tuple, list)(dims)):
        raise ValueError("torch.Size needs ints")
    return tuple(dims)


def _ordered_dict(items: Any = ()) -> dict:
    if any(type(kv) is not tuple or len(kv) != 2 or type(kv[0]) not in _KEYS for kv in _only(tuple, list)(items)):
        raise ValueError("OrderedDict needs (name, value) pairs")
    return dict(items)


_CALLS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch", "Size"): _size,
    ("torch.serialization", "_get_layout"): _only(str),
    (_MD, "_MEM_FORMAT_ENCODING"): _only(int),
    ("pathlib", "PosixPath"): lambda *parts: "/".join(map(_only(str), parts)),
    ("pathlib", "PurePosixPath"): lambda *parts: "/".join(map(_only(str), parts)),
    ("collections", "OrderedDict"): _ordered_dict,
}
_KEYS = (str, Obj)  # dict keys DCP's metadata uses: names and MetadataIndex records (hashed by identity)
_CONTAINERS = (tuple, list, dict, Obj)
_MUTABLE = (list, dict, Obj)


def _what(x: Any) -> str:
    """A short, bounded description of a value from the file (never its repr: it may be large)."""
    return f"{x.module}.{x.name}" if isinstance(x, _Global) else type(x).__name__


def _global(module: Any, name: Any, where: str) -> Any:
    """A class or function DCP's metadata uses, or a dtype; looked up in fixed tables only."""
    if type(module) is not str or type(name) is not str:
        raise FormatError(f"{where}: STACK_GLOBAL of a {_what(module)} and a {_what(name)}, not two names")
    if (module, name) in _CLASSES or (module, name) in _CALLS:
        return _Global(module, name)
    dtype = torch_dtype_named(name) if module == "torch" else None
    if dtype is not None:
        return dtype
    raise FormatError(
        f"{where}: refers to {module[:100]}.{name[:100]}, which is not part of DCP's metadata; "
        "refusing to read it (loading it would run code from the file)"
    )


class _Built:
    """Nesting depth and size (shared references counted each time) of every container read builds."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.sizes: dict[int, tuple[int, int]] = {}  # id -> (depth, size)
        self.inside: set[int] = set()  # ids of mutable containers already held by another value
        self.keep: list[Any] = []  # every container stays alive, so no id is reused

    def measure(self, x: Any) -> tuple[int, int]:
        return self.sizes.get(id(x), (1, 1)) if type(x) in _CONTAINERS else (0, 1)

    def made(self, x: Any, items: Any) -> Any:
        """Register ``x``, a new container built from ``items`` (an empty one needs no entry); return it."""
        if items and id(x) not in self.sizes:
            self.sizes[id(x)] = self._add((1, 1), items)
            self.keep.append(x)
        return x

    def grow(self, x: Any, items: Any) -> None:
        """``items`` are about to be put into ``x`` (a list, dict or record being built)."""
        if id(x) in self.inside or any(i is x for i in items):
            raise FormatError(
                f"{self.where}: malformed pickle (a {type(x).__name__} is changed after it was "
                "put inside another value, or put inside itself)"
            )
        if id(x) not in self.sizes:
            self.keep.append(x)
        self.sizes[id(x)] = self._add(self.measure(x), items)

    def _add(self, start: tuple[int, int], items: Any) -> tuple[int, int]:
        depth, size = start
        for i in items:
            d, s = self.measure(i)
            depth, size = max(depth, d + 1), size + s
            if type(i) in _MUTABLE:
                self.inside.add(id(i))
        if depth > knobs.MAX_DEPTH:
            raise FormatError(
                f"{self.where}: values nested more than {knobs.MAX_DEPTH} deep (tensorkeep.knobs."
                "MAX_DEPTH); DCP's metadata is about 10 deep: not a DCP metadata file"
            )
        if size > knobs.MAX_JSON_VALUES:
            raise LimitError(
                f"{self.where}: a value of more than {knobs.MAX_JSON_VALUES} parts (shared ones "
                "counted each time they are used); raise tensorkeep.knobs.MAX_JSON_VALUES to read it"
            )
        return depth, size


def read_metadata(raw: bytes, where: str) -> Obj:
    """The ``Metadata`` record of a DCP ``.metadata`` file; builds only allowlisted records.

    >>> read_metadata(b"\\x80\\x04\\x8c\\x02os\\x8c\\x06system\\x93.", "f")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    tensorkeep.errors.FormatError: f: refers to os.system, which is not part of DCP's metadata; refusing to read it ...
    """
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    built = _Built(where)
    pos = ops = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(raw):
            raise FormatError(f"{where}: truncated pickle")
        pos += n
        return raw[pos - n : pos]

    def text(n: int) -> str:
        if n > _MAX_TEXT:
            raise FormatError(f"{where}: a string of {n} bytes at byte {pos}; DCP's are names (at most {_MAX_TEXT})")
        try:
            return take(n).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise FormatError(f"{where}: a string at byte {pos - n} is not UTF-8") from None

    def pop_mark() -> list[Any]:
        if not marks:
            raise FormatError(f"{where}: malformed pickle (no MARK)")
        at = marks.pop()
        items = stack[at:]
        del stack[at:]
        return items

    def unpack(fmt: str) -> Any:
        return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

    def pop(n: int) -> list[Any]:
        if len(stack) < n:
            raise FormatError(f"{where}: malformed pickle (stack underflow)")
        items = stack[len(stack) - n :]
        del stack[len(stack) - n :]
        return items

    while True:
        op = take(1)
        ops += 1
        if ops > knobs.MAX_JSON_VALUES:
            raise LimitError(
                f"{where}: more than {knobs.MAX_JSON_VALUES} pickle opcodes (about 70 per chunk); "
                "raise tensorkeep.knobs.MAX_JSON_VALUES to read it"
            )
        if op == b"\x80":  # PROTO
            take(1)
        elif op == b"\x95":  # FRAME: a length hint, no content of its own
            take(8)
        elif op == b".":  # STOP
            break
        elif op == b"(":  # MARK
            marks.append(len(stack))
        elif op in (b")", b"}", b"]"):  # EMPTY_TUPLE / DICT / LIST
            stack.append(() if op == b")" else {} if op == b"}" else [])
        elif op in (b"\x85", b"\x86", b"\x87", b"t"):  # TUPLE1..3, TUPLE
            items = pop_mark() if op == b"t" else pop(op[0] - 0x84)
            stack.append(built.made(tuple(items), items))
        elif op == b"\x8c":  # SHORT_BINUNICODE
            stack.append(text(unpack("<B")))
        elif op == b"X":  # BINUNICODE
            stack.append(text(unpack("<I")))
        elif op == b"K":  # BININT1
            stack.append(unpack("<B"))
        elif op == b"M":  # BININT2
            stack.append(unpack("<H"))
        elif op == b"J":  # BININT
            stack.append(unpack("<i"))
        elif op == b"\x8a":  # LONG1
            stack.append(int.from_bytes(take(unpack("<B")), "little", signed=True))
        elif op == b"G":  # BINFLOAT
            stack.append(unpack(">d"))
        elif op in (b"N", b"\x88", b"\x89"):  # NONE, NEWTRUE, NEWFALSE
            stack.append({b"N": None, b"\x88": True, b"\x89": False}[op])
        elif op in (b"\x94", b"q", b"r"):  # MEMOIZE, BINPUT, LONG_BINPUT
            i = len(memo) if op == b"\x94" else unpack("<B" if op == b"q" else "<I")
            memo[i] = _top(stack, where)
        elif op in (b"h", b"j"):  # BINGET, LONG_BINGET
            i = unpack("<B" if op == b"h" else "<I")
            if i not in memo:
                raise FormatError(f"{where}: malformed pickle (memo {i} unset)")
            stack.append(memo[i])
        elif op == b"\x93":  # STACK_GLOBAL
            module, name = pop(2)
            stack.append(_global(module, name, where))
        elif op in (b"a", b"e"):  # APPEND, APPENDS
            items = pop(1) if op == b"a" else pop_mark()
            target = _being_built(_top(stack, where), list, where)
            built.grow(target, items)
            target.extend(items)
        elif op in (b"s", b"u"):  # SETITEM, SETITEMS
            items = pop(2) if op == b"s" else pop_mark()
            target = _being_built(_top(stack, where), dict, where)
            keys = items[::2]
            if len(items) % 2:
                raise FormatError(f"{where}: malformed pickle (SETITEMS of an odd number of items)")
            bad = [k for k in keys if type(k) not in _KEYS]
            if bad:
                raise FormatError(
                    f"{where}: malformed pickle (a dict key that is a {_what(bad[0])}; "
                    "DCP's metadata keys are names and MetadataIndex records)"
                )
            built.grow(target, items)
            target.update(zip(keys, items[1::2]))
        elif op == b"\x81":  # NEWOBJ: cls(*args) for an allowlisted class
            cls, args = pop(2)
            if not isinstance(cls, _Global) or (cls.module, cls.name) not in _CLASSES or args != ():
                raise FormatError(f"{where}: NEWOBJ of {_what(cls)} is not a DCP metadata record")
            stack.append(Obj(cls.name))
        elif op == b"b":  # BUILD: set the state of a record
            (state,) = pop(1)
            obj = _top(stack, where)
            if not isinstance(obj, Obj):
                raise FormatError(f"{where}: BUILD on {_what(obj)}")
            built.grow(obj, [state])
            obj.state = state
        elif op == b"R":  # REDUCE: one of the allowlisted pure functions of _CALLS
            fn, args = pop(2)
            if not isinstance(fn, _Global) or (fn.module, fn.name) not in _CALLS or type(args) is not tuple:
                raise FormatError(f"{where}: call of {_what(fn)} is not allowed in DCP metadata")
            try:
                value = _CALLS[(fn.module, fn.name)](*args)
            except (TypeError, ValueError) as e:
                raise FormatError(f"{where}: bad arguments for {fn.module}.{fn.name}: {str(e)[:200]}") from None
            stack.append(built.made(value, args) if type(value) in _CONTAINERS else value)
        else:
            raise FormatError(f"{where}: pickle opcode {op!r} at byte {pos - 1} is not one DCP metadata uses")
    result = _top(stack, where)
    if not isinstance(result, Obj) or result.cls != "Metadata":
        raise FormatError(f"{where}: does not hold a DCP Metadata record")
    return result


def _top(stack: list[Any], where: str) -> Any:
    if not stack:
        raise FormatError(f"{where}: malformed pickle (stack underflow)")
    return stack[-1]


def _being_built(x: Any, t: type, where: str) -> Any:
    if type(x) is not t:
        raise FormatError(f"{where}: malformed pickle ({'APPEND to' if t is list else 'SETITEM on'} a {_what(x)})")
    return x


# ----------------------------------------------------------------------------------- convert


@dataclass
class _Range:
    """Bytes ``offset .. offset + length`` of data file ``name``: one chunk of ``fqn`` (or its value)."""

    name: str
    offset: int
    length: int
    fqn: str
    box: tuple | None = None  # (offsets, sizes) of a tensor chunk; None for a non-tensor value


def _range(dcp_dir: str, info: Any, fqn: str, what: str) -> _Range:
    if not isinstance(info, Obj):
        raise FormatError(f"{dcp_dir}: {what} of {fqn!r} has a storage entry of type {_what(info)}")
    name, offset, length = info.get("relative_path"), info.get("offset"), info.get("length")
    if type(name) is not str or not name or any(c in name for c in "/\\\0") or name in (".", ".."):
        raise FormatError(
            f"{dcp_dir}: {what} of {fqn!r} is stored in {name!r:.200}, which is not a file of the directory"
        )
    if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
        raise FormatError(f"{dcp_dir}: {what} of {fqn!r} has a bad byte range {offset!r:.40} + {length!r:.40}")
    if info.get("transform_descriptors"):
        raise FormatError(
            f"{dcp_dir}: {fqn!r} is stored with transforms (compression, ...), which convert_dcp does not support"
        )
    return _Range(name, offset, length, fqn)


def _dims(v: Any, n: int | None, what: str) -> tuple[int, ...]:
    if (
        type(v) is not tuple
        or len(v) > knobs.MAX_NDIM
        or (n is not None and len(v) != n)
        or any(type(x) is not int for x in v)
    ):
        raise FormatError(
            f"{what} must be a tuple of {n if n is not None else 'at most ' + str(knobs.MAX_NDIM)} "
            f"ints, found a {_what(v)}{f' of {len(v)}' if type(v) is tuple else ''}"
        )
    return v


def _tensor_plan(
    dcp_dir: str, fqn: str, md: Obj, stored: list[tuple[Any, Any]]
) -> tuple[torch.dtype, tuple, list[_Range]]:
    """Dtype, size and the byte ranges of a tensor's chunks, all checked; raises FormatError."""
    props, size = md.get("properties"), md.get("size")
    dtype = props.state[0] if isinstance(props, Obj) and type(props.state) is tuple and props.state else None
    if not isinstance(dtype, torch.dtype):
        raise FormatError(f"{dcp_dir}: tensor {fqn!r} has no dtype in the metadata")
    if name_of_torch(dtype) is None:
        raise FormatError(f"{dcp_dir}: tensor {fqn!r} is {dtype}, which a tensorkeep file cannot hold")
    size = _dims(size, None, f"{dcp_dir}: the size of tensor {fqn!r}")
    span = dtype.itemsize
    for d in size:
        span *= d or 1
    if any(d < 0 or d > _MAX_DIM for d in size) or span > _MAX_DIM:
        raise FormatError(
            f"{dcp_dir}: tensor {fqn!r} has size {list(size)}: dimensions must be 0 .. 2**62, "
            "their non-zero product times the item size at most 2**62 bytes"
        )
    chunks = md.get("chunks")
    if type(chunks) is not list or any(not isinstance(c, Obj) for c in chunks):
        raise FormatError(f"{dcp_dir}: tensor {fqn!r} needs a list of chunk records, found a {_what(chunks)}")
    boxes = [
        (
            _dims(c.get("offsets"), len(size), f"{dcp_dir}: chunk offsets of {fqn!r}"),
            _dims(c.get("sizes"), len(size), f"{dcp_dir}: chunk sizes of {fqn!r}"),
        )
        for c in chunks
    ]
    why = check_cover(fqn, size, boxes, dcp_dir)
    if why:
        raise FormatError(why)
    # match chunks to storage entries by sorting on their offsets (a dict of tuples from a file could be flooded)
    full = sorted(b for b in boxes if _volume(b[1]))
    stored = sorted(
        (e for e in stored if type(e[0]) is tuple and all(type(x) is int for x in e[0])), key=lambda e: e[0]
    )
    ranges, i = [], 0
    for off, sz in full:
        while i < len(stored) and stored[i][0] < off:
            i += 1
        if i == len(stored) or stored[i][0] != off or (i + 1 < len(stored) and stored[i + 1][0] == off):
            found = "none" if i == len(stored) or stored[i][0] != off else "two"
            raise FormatError(
                f"{dcp_dir}: the chunk of tensor {fqn!r} at offsets {list(off)} needs one storage "
                f"entry in the metadata, found {found}"
            )
        r = _range(dcp_dir, stored[i][1], fqn, f"chunk {list(off)}")
        r.box = (off, sz)
        need = _volume(sz) * dtype.itemsize
        if r.length < need:
            raise FormatError(
                f"{dcp_dir}: chunk {list(off)} of tensor {fqn!r} ({list(sz)} of {dtype}) needs "
                f"{need} bytes, its storage entry holds {r.length}"
            )
        ranges.append(r)
    return dtype, size, ranges


def _check_files(dcp_dir: str, ranges: list[_Range]) -> None:
    """Every range lies inside a regular data file and shares no byte with another."""
    by_file: dict[str, list[_Range]] = {}
    for r in ranges:
        by_file.setdefault(r.name, []).append(r)
    for name, rs in by_file.items():
        try:
            st = os.stat(os.path.join(dcp_dir, name))
        except FileNotFoundError:
            raise FormatError(f"{dcp_dir}: {name} is missing; the metadata stores {rs[0].fqn!r} in it") from None
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{dcp_dir}: {name} is not a regular file; the metadata stores {rs[0].fqn!r} in it")
        rs = sorted((r for r in rs if r.length), key=lambda r: r.offset)
        for a, b in zip(rs, rs[1:]):
            if a.offset + a.length > b.offset:
                raise FormatError(
                    f"{dcp_dir}: {a.fqn!r} and {b.fqn!r} are stored in overlapping bytes of {name} "
                    f"({a.offset}+{a.length} and {b.offset}+{b.length}); each chunk has its own"
                )
        if rs and rs[-1].offset + rs[-1].length > st.st_size:
            r = max(rs, key=lambda r: r.offset + r.length)
            raise FormatError(
                f"{dcp_dir}: {name} is truncated: {r.fqn!r} needs bytes "
                f"{r.offset}..{r.offset + r.length}, the file has {st.st_size}"
            )


def _blob(dcp_dir: str, r: _Range) -> bytes:
    with open(_io.open_regular(os.path.join(dcp_dir, r.name)), "rb") as f:
        f.seek(r.offset)
        data = f.read(r.length)
    if len(data) != r.length:
        raise FormatError(f"{dcp_dir}: {r.name} is truncated: {r.fqn!r} needs bytes {r.offset}..{r.offset + r.length}")
    return data


def _torch_value(data: bytes, dcp_dir: str, fqn: str) -> Any:
    # checked first: CRC-32s, and no compressed entry (a few bytes could make torch allocate gigabytes)
    ptzip.check_buffer(f"{dcp_dir}: {fqn!r}", data)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise FormatError(
            f"{dcp_dir}: {fqn!r} is not readable with torch.load(weights_only=True) "
            f"({type(e).__name__}: {str(e)[:200]}); tensorkeep never runs code from a file"
        ) from None
    check_nesting(obj, f"{dcp_dir}: {fqn!r}")  # a DAG of shared dicts would take saving it 2**40 steps
    return obj


def _tensor(dcp_dir: str, fqn: str, dtype: torch.dtype, size: tuple, ranges: list[_Range]) -> torch.Tensor:
    out = torch.zeros(size, dtype=dtype)  # every element is then written: the chunks tile it (checked)
    for r in ranges:
        offsets, sizes = r.box
        data = _blob(dcp_dir, r)
        if data[:4] == b"PK\x03\x04":  # torch.save of the chunk (DCP's default)
            piece = _torch_value(data, dcp_dir, fqn)
        elif len(data) == _volume(sizes) * dtype.itemsize and data:  # DCP's safetensors format: the raw bytes
            piece = torch.frombuffer(bytearray(data), dtype=dtype).reshape(sizes)
        else:  # an empty chunk, or raw bytes of another length (refused below)
            piece = torch.empty(sizes, dtype=dtype) if not data and not _volume(sizes) else None
        if (
            type(piece) is not torch.Tensor
            or piece.layout != torch.strided
            or tuple(piece.shape) != sizes
            or piece.dtype != dtype
        ):
            raise FormatError(
                f"{dcp_dir}: chunk {list(offsets)} of {fqn!r} is not a {name_of_torch(dtype)} tensor of {list(sizes)}"
            )
        out[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))] = piece
    return out


_GAP, _TAKEN = object(), object()  # a list slot no entry fills; a slot an entry's value will fill


def _slot(root: dict, path: Any, made: dict[int, Any], room: list[int], where: str) -> tuple[Any, Any]:
    """Make room for a value at ``path`` (str keys index dicts, int keys lists, as in DCP's own unflatten)
    and return (container, key). ``made``: the containers made so far, by id. Refuses a path that
    passes through or lands on another entry's value."""
    if type(path) is not tuple or not path or len(path) >= knobs.MAX_DEPTH:
        raise FormatError(
            f"{where}: a path in planner_data must be a tuple of 1 .. {knobs.MAX_DEPTH - 1} "
            f"names and indexes, found a {_what(path)}"
        )
    cur: Any = root
    for i, key in enumerate(path):
        if type(key) is str and type(cur) is dict:
            free = key not in cur
        elif type(key) is int and key >= 0 and type(cur) is list:
            if key >= len(cur):
                room[0] -= key + 1 - len(cur)
                if room[0] < 0:
                    raise FormatError(
                        f"{where}: list index {key} in planner_data leaves more empty slots than "
                        "the checkpoint has entries"
                    )
                cur.extend([_GAP] * (key + 1 - len(cur)))
            free = cur[key] is _GAP
        else:
            raise FormatError(
                f"{where}: item {i} of a path in planner_data is a {_what(key)} where "
                f"{'a dict needs a name' if type(cur) is dict else 'a list needs an index >= 0'}"
            )
        if i == len(path) - 1:
            if not free:
                raise FormatError(f"{where}: its path in planner_data leads where another entry's value is")
            cur[key] = _TAKEN
            return cur, key
        if free:
            cur[key] = {} if type(path[i + 1]) is str else []
            made[id(cur[key])] = cur[key]
        elif id(cur[key]) not in made:
            raise FormatError(f"{where}: its path in planner_data runs through another entry's value")
        cur = cur[key]
    raise AssertionError("unreachable")


def convert_dcp(dcp_dir: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> None:
    """Convert a torch DCP checkpoint directory into one tensorkeep file (whole tensors).

    Nested state (DCP flattens it to dotted names) comes back nested. Nothing in the DCP
    files is executed: the metadata is read by an allowlisting reader, the data with
    ``torch.load(weights_only=True)``. Everything is checked before a tensor is allocated;
    a damaged or hostile directory raises :class:`FormatError`.

    >>> import torch, torch.distributed.checkpoint as dcp, tensorkeep as tk   # doctest: +SKIP
    >>> dcp.save({"w": torch.ones(2), "step": 3}, checkpoint_id="/tmp/dcp-ckpt")  # doctest: +SKIP
    >>> convert_dcp("/tmp/dcp-ckpt", "/tmp/from-dcp.tk"); tk.load("/tmp/from-dcp.tk")  # doctest: +SKIP
    {'w': tensor([1., 1.]), 'step': 3}
    """
    dcp_dir = os.fspath(dcp_dir)
    mpath = os.path.join(dcp_dir, ".metadata")
    try:
        with open(_io.open_regular(mpath), "rb") as f:  # a FIFO is refused, not waited on
            raw = f.read(knobs.MAX_HEADER_BYTES + 1)
    except FileNotFoundError:
        raise FormatError(f"{dcp_dir}: no .metadata, so not a torch.distributed.checkpoint directory") from None
    if len(raw) > knobs.MAX_HEADER_BYTES:
        raise LimitError(
            f"{mpath}: larger than {knobs.MAX_HEADER_BYTES} bytes; raise tensorkeep.knobs.MAX_HEADER_BYTES to read it"
        )
    meta = read_metadata(raw, mpath)
    items, storage = meta.get("state_dict_metadata"), meta.get("storage_data")
    if type(items) is not dict or type(storage) is not dict:
        raise FormatError(f"{mpath}: Metadata needs state_dict_metadata and storage_data")
    stored: dict[str, list[tuple[Any, Any]]] = {}  # fqn -> [(chunk offsets or None, storage entry)]
    for k, v in storage.items():
        if isinstance(k, Obj) and type(k.get("fqn")) is str:
            stored.setdefault(k.get("fqn"), []).append((k.get("offset"), v))
    paths = meta.get("planner_data") if type(meta.get("planner_data")) is dict else {}
    out: dict[Any, Any] = {}
    made: dict[int, Any] = {}
    room = [len(items) + 1024]
    todo: list[tuple[Any, Any, Callable[[], Any]]] = []
    ranges: list[_Range] = []
    for fqn, md in items.items():
        if type(fqn) is not str or not isinstance(md, Obj):
            raise FormatError(f"{mpath}: entry {fqn!r:.200} is not a named metadata record")
        if md.cls == "TensorStorageMetadata":
            dtype, size, rs = _tensor_plan(dcp_dir, fqn, md, stored.get(fqn, []))
            load: Callable[[], Any] = lambda fqn=fqn, t=(dtype, size, rs): _tensor(dcp_dir, fqn, *t)
        elif md.cls == "BytesStorageMetadata":
            entries = [v for off, v in stored.get(fqn, []) if off is None]
            if len(entries) != 1:
                raise FormatError(f"{mpath}: entry {fqn!r} needs one storage entry, found {len(entries)}")
            rs = [_range(dcp_dir, entries[0], fqn, "the value")]
            load = lambda fqn=fqn, r=rs[0]: _torch_value(_blob(dcp_dir, r), dcp_dir, fqn)
        else:
            raise FormatError(f"{mpath}: entry {fqn!r} ({md.cls}) has no data")
        ranges += rs
        path = paths.get(fqn, (fqn,))
        todo.append((*_slot(out, path, made, room, f"{mpath}: entry {fqn!r}"), load))
    _check_files(dcp_dir, ranges)
    for container, key, load in todo:  # only now: allocate and read
        container[key] = load()
    for c in made.values():
        if type(c) is list:
            c[:] = [None if x is _GAP else x for x in c]
    save(out, out_path)
