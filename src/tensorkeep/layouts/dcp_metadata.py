"""Read DCP's ``.metadata`` pickle without unpickling: a small opcode reader that imports and calls nothing.

It knows the opcodes DCP emits and the classes and functions its metadata uses (``_CLASSES``,
``_CALLS``, dtypes from a fixed table) and builds plain :class:`Obj` records. What a file can make it
build is bounded: opcodes, and every value's size counting shared parts each time, by
``knobs.MAX_JSON_VALUES``; nesting by ``knobs.MAX_DEPTH``; strings; the file by
``knobs.MAX_HEADER_BYTES``. Dict keys are names and records only (no tuples or ints a file could make
collide), and nothing changes once inside another value (no cycles).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tensorkeep import knobs
from tensorkeep.core.dtypes import torch_dtype_named
from tensorkeep.errors import FormatError, LimitError

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
MAX_DIM = 1 << 62


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
            raise ValueError(f"needs a {' or '.join(t.__name__ for t in types)}, got a {what_is(value)}")
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


def what_is(x: Any) -> str:
    """A short, bounded description of a value from the file (never its repr: it may be large)."""
    return f"{x.module}.{x.name}" if isinstance(x, _Global) else type(x).__name__


def _global(module: Any, name: Any, where: str) -> Any:
    """A class or function DCP's metadata uses, or a dtype; looked up in fixed tables only."""
    if type(module) is not str or type(name) is not str:
        raise FormatError(f"{where}: STACK_GLOBAL of a {what_is(module)} and a {what_is(name)}, not two names")
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
                    f"{where}: malformed pickle (a dict key that is a {what_is(bad[0])}; "
                    "DCP's metadata keys are names and MetadataIndex records)"
                )
            built.grow(target, items)
            target.update(zip(keys, items[1::2]))
        elif op == b"\x81":  # NEWOBJ: cls(*args) for an allowlisted class
            cls, args = pop(2)
            if not isinstance(cls, _Global) or (cls.module, cls.name) not in _CLASSES or args != ():
                raise FormatError(f"{where}: NEWOBJ of {what_is(cls)} is not a DCP metadata record")
            stack.append(Obj(cls.name))
        elif op == b"b":  # BUILD: set the state of a record
            (state,) = pop(1)
            obj = _top(stack, where)
            if not isinstance(obj, Obj):
                raise FormatError(f"{where}: BUILD on {what_is(obj)}")
            built.grow(obj, [state])
            obj.state = state
        elif op == b"R":  # REDUCE: one of the allowlisted pure functions of _CALLS
            fn, args = pop(2)
            if not isinstance(fn, _Global) or (fn.module, fn.name) not in _CALLS or type(args) is not tuple:
                raise FormatError(f"{where}: call of {what_is(fn)} is not allowed in DCP metadata")
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
        raise FormatError(f"{where}: malformed pickle ({'APPEND to' if t is list else 'SETITEM on'} a {what_is(x)})")
    return x


# ----------------------------------------------------------------------------------- convert
