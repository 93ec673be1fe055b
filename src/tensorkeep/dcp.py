"""Convert a torch DCP (``torch.distributed.checkpoint``) directory into one tensorkeep file.

DCP's ``.metadata`` is a pickle (protocol 4) of a few dataclasses. torch's weights-only
unpickler cannot read it (no FRAME, SHORT_BINUNICODE, MEMOIZE, STACK_GLOBAL in torch 2.13),
and ``pickle`` itself would run whatever the file names. So :func:`read_metadata` is a small
opcode reader of its own: it knows the opcodes DCP emits and the exact classes and functions
DCP's metadata uses (table ``_ALLOWED``), builds plain :class:`Obj` records for them, and
imports and calls nothing. Anything else is a :class:`FormatError`.

The ``.distcp`` data files hold, at the offsets the metadata gives, either a ``torch.save``
blob per tensor chunk and per non-tensor value (read with ``torch.load(weights_only=True)``,
the vetted weights-only loader) or, for DCP's safetensors format, the raw bytes.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .dtypes import name_of_torch
from .errors import FormatError
from .writer import save

_MD = "torch.distributed.checkpoint.metadata"
_CLASSES = {(_MD, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                               "TensorProperties", "MetadataIndex", "StorageMeta")}
_CLASSES.add(("torch.distributed.checkpoint.filesystem", "_StorageInfo"))
_CALLS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch", "Size"): lambda dims=(): tuple(dims),
    ("torch.serialization", "_get_layout"): lambda name: str(name),
    (_MD, "_MEM_FORMAT_ENCODING"): lambda value: int(value),
    ("pathlib", "PosixPath"): lambda *parts: "/".join(map(str, parts)),
    ("pathlib", "PurePosixPath"): lambda *parts: "/".join(map(str, parts)),
    ("collections", "OrderedDict"): lambda items=(): dict(items),
}
_MAX_METADATA_BYTES = 1 << 30


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


def _global(module: Any, name: Any, where: str) -> Any:
    key = (module, name)
    if key in _CLASSES or key in _CALLS:
        return _Global(module, name)
    if module == "torch" and isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)  # a dtype: an attribute of the torch module, nothing imported
    raise FormatError(f"{where}: refers to {module}.{name}, which is not part of DCP's metadata; "
                      "refusing to read it (loading it would run code from the file)")


def read_metadata(raw: bytes, where: str) -> Obj:
    """The ``Metadata`` record of a DCP ``.metadata`` file; builds only allowlisted records."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(raw):
            raise FormatError(f"{where}: truncated pickle")
        pos += n
        return raw[pos - n : pos]

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
        elif op in (b"\x85", b"\x86", b"\x87"):  # TUPLE1..3
            stack.append(tuple(pop(op[0] - 0x84)))
        elif op == b"t":  # TUPLE
            stack.append(tuple(pop_mark()))
        elif op == b"\x8c":  # SHORT_BINUNICODE
            stack.append(take(unpack("<B")).decode("utf-8", "surrogatepass"))
        elif op == b"X":  # BINUNICODE
            stack.append(take(unpack("<I")).decode("utf-8", "surrogatepass"))
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
        elif op == b"a":  # APPEND
            (v,) = pop(1)
            _list(_top(stack, where), where).append(v)
        elif op == b"e":  # APPENDS
            items = pop_mark()
            _list(_top(stack, where), where).extend(items)
        elif op == b"s":  # SETITEM
            k, v = pop(2)
            _dict(_top(stack, where), where)[_key(k, where)] = v
        elif op == b"u":  # SETITEMS
            items = pop_mark()
            d = _dict(_top(stack, where), where)
            for k, v in zip(items[::2], items[1::2]):
                d[_key(k, where)] = v
        elif op == b"\x81":  # NEWOBJ: cls(*args) for an allowlisted class
            cls, args = pop(2)
            if not isinstance(cls, _Global) or (cls.module, cls.name) not in _CLASSES or args != ():
                raise FormatError(f"{where}: NEWOBJ of {cls!r:.80} is not a DCP metadata record")
            stack.append(Obj(cls.name))
        elif op == b"b":  # BUILD: set the state of a record
            (state,) = pop(1)
            obj = _top(stack, where)
            if not isinstance(obj, Obj):
                raise FormatError(f"{where}: BUILD on {type(obj).__name__}")
            obj.state = state
        elif op == b"R":  # REDUCE: one of the allowlisted pure functions of _CALLS
            fn, args = pop(2)
            if not isinstance(fn, _Global) or (fn.module, fn.name) not in _CALLS or type(args) is not tuple:
                raise FormatError(f"{where}: call of {fn!r:.80} is not allowed in DCP metadata")
            try:
                stack.append(_CALLS[(fn.module, fn.name)](*args))
            except (TypeError, ValueError) as e:
                raise FormatError(f"{where}: bad arguments for {fn.module}.{fn.name}: {e}") from None
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


def _list(x: Any, where: str) -> list:
    if type(x) is not list:
        raise FormatError(f"{where}: malformed pickle (APPEND to a {type(x).__name__})")
    return x


def _dict(x: Any, where: str) -> dict:
    if type(x) is not dict:
        raise FormatError(f"{where}: malformed pickle (SETITEM on a {type(x).__name__})")
    return x


def _key(k: Any, where: str) -> Any:
    try:
        hash(k)
    except TypeError:
        raise FormatError(f"{where}: malformed pickle (unhashable dict key)") from None
    return k


# ----------------------------------------------------------------------------------- convert


def _blob(dcp_dir: str, info: Obj, fqn: str) -> bytes:
    name, offset, length = info.get("relative_path"), info.get("offset"), info.get("length")
    if type(name) is not str or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise FormatError(f"{dcp_dir}: {fqn!r} is stored in {name!r}, which is not a file of the directory")
    if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
        raise FormatError(f"{dcp_dir}: {fqn!r} has a bad byte range {offset!r} + {length!r}")
    if info.get("transform_descriptors"):
        raise FormatError(f"{dcp_dir}: {fqn!r} is stored with transforms {info.get('transform_descriptors')} "
                          "(compression, ...), which convert_dcp does not support")
    with open(os.path.join(dcp_dir, name), "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise FormatError(f"{dcp_dir}: {name} is truncated: {fqn!r} needs bytes {offset}..{offset + length}")
    return data


def _torch_value(data: bytes, dcp_dir: str, fqn: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the weights-only loader refuses with several types
        raise FormatError(f"{dcp_dir}: {fqn!r} is not readable with torch.load(weights_only=True) "
                          f"({type(e).__name__}: {str(e)[:200]}); tensorkeep never runs code from a file") from None


def _tensor(dcp_dir: str, fqn: str, md: Obj, where: dict[tuple, Obj]) -> torch.Tensor:
    props, size = md.get("properties"), md.get("size")
    dtype = props.state[0] if isinstance(props, Obj) and type(props.state) is tuple and props.state else None
    if not isinstance(dtype, torch.dtype) or type(size) is not tuple:
        raise FormatError(f"{dcp_dir}: tensor {fqn!r} has no dtype or size in the metadata")
    out = torch.zeros(size, dtype=dtype)
    for chunk in md.get("chunks") or []:
        offsets, sizes = chunk.get("offsets"), chunk.get("sizes")
        info = where.get((fqn, offsets))
        if info is None or type(sizes) is not tuple or len(sizes) != len(size) or len(offsets) != len(size):
            raise FormatError(f"{dcp_dir}: chunk {offsets} of {fqn!r} has no storage entry or bad sizes")
        data = _blob(dcp_dir, info, fqn)
        if data[:4] == b"PK\x03\x04":  # torch.save of the chunk (DCP's default)
            piece = _torch_value(data, dcp_dir, fqn)
        else:  # DCP's safetensors format: the raw bytes
            piece = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
            piece = piece.reshape(sizes) if piece.numel() == torch.Size(sizes).numel() else None
        if not isinstance(piece, torch.Tensor) or tuple(piece.shape) != sizes or piece.dtype != dtype:
            raise FormatError(f"{dcp_dir}: chunk {offsets} of {fqn!r} is not a {name_of_torch(dtype)} tensor of {list(sizes)}")
        out[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))] = piece
    return out


def _set(root: dict, path: tuple, value: Any) -> None:
    """Put ``value`` at ``path`` (str keys make dicts, int keys lists), as DCP's own unflatten does."""
    cur: Any = root
    for key, nxt in zip(path, path[1:]):
        empty: Any = {} if type(nxt) is str else []
        if isinstance(cur, dict):
            cur = cur.setdefault(key, empty)
        else:
            cur.extend([None] * (key + 1 - len(cur)))
            cur[key] = empty if cur[key] is None else cur[key]
            cur = cur[key]
    if isinstance(cur, list):
        cur.extend([None] * (path[-1] + 1 - len(cur)))
    cur[path[-1]] = value


def convert_dcp(dcp_dir: "str | os.PathLike[str]", out_path: "str | os.PathLike[str]") -> None:
    """Convert a torch DCP checkpoint directory into one tensorkeep file (whole tensors).

    Nested state (DCP flattens it to dotted names) comes back nested. Nothing in the DCP
    files is executed: the metadata is read by an allowlisting reader, the data with
    ``torch.load(weights_only=True)``.

    >>> import torch, torch.distributed.checkpoint as dcp, tensorkeep as tk   # doctest: +SKIP
    >>> dcp.save({"w": torch.ones(2), "step": 3}, checkpoint_id="/tmp/dcp-ckpt")  # doctest: +SKIP
    >>> convert_dcp("/tmp/dcp-ckpt", "/tmp/from-dcp.tk"); tk.load("/tmp/from-dcp.tk")  # doctest: +SKIP
    {'w': tensor([1., 1.]), 'step': 3}
    """
    dcp_dir = os.fspath(dcp_dir)
    mpath = os.path.join(dcp_dir, ".metadata")
    try:
        with open(mpath, "rb") as f:
            raw = f.read(_MAX_METADATA_BYTES + 1)
    except FileNotFoundError:
        raise FormatError(f"{dcp_dir}: no .metadata, so not a torch.distributed.checkpoint directory") from None
    if len(raw) > _MAX_METADATA_BYTES:
        raise FormatError(f"{mpath}: larger than {_MAX_METADATA_BYTES} bytes")
    meta = read_metadata(raw, mpath)
    items, storage = meta.get("state_dict_metadata"), meta.get("storage_data")
    if not isinstance(items, dict) or not isinstance(storage, dict):
        raise FormatError(f"{mpath}: Metadata needs state_dict_metadata and storage_data")
    where = {(k.get("fqn"), k.get("offset")): v for k, v in storage.items() if isinstance(k, Obj) and isinstance(v, Obj)}
    paths = meta.get("planner_data") if isinstance(meta.get("planner_data"), dict) else {}
    out: dict[Any, Any] = {}
    for fqn, md in items.items():
        if not isinstance(md, Obj):
            raise FormatError(f"{mpath}: entry {fqn!r} is not a metadata record")
        if md.cls == "TensorStorageMetadata":
            value = _tensor(dcp_dir, fqn, md, where)
        elif md.cls == "BytesStorageMetadata" and (fqn, None) in where:
            value = _torch_value(_blob(dcp_dir, where[(fqn, None)], fqn), dcp_dir, fqn)
        else:
            raise FormatError(f"{mpath}: entry {fqn!r} ({md.cls}) has no data")
        path = paths.get(fqn)
        _set(out, tuple(path) if isinstance(path, tuple) and path else (fqn,), value)
    save(out, out_path)
