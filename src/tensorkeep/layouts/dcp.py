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
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from tensorkeep import knobs
from tensorkeep.core import ptzip
from tensorkeep.core.boxes import check_cover
from tensorkeep.core.boxes import volume as _volume
from tensorkeep.core.dtypes import name_of_torch
from tensorkeep.core.tree import check_nesting
from tensorkeep.errors import FormatError, LimitError
from tensorkeep.file.writer import save
from tensorkeep.layouts.dcp_metadata import MAX_DIM, Obj, read_metadata, what_is
from tensorkeep.storage import local as _io


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
        raise FormatError(f"{dcp_dir}: {what} of {fqn!r} has a storage entry of type {what_is(info)}")
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
            f"ints, found a {what_is(v)}{f' of {len(v)}' if type(v) is tuple else ''}"
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
    if any(d < 0 or d > MAX_DIM for d in size) or span > MAX_DIM:
        raise FormatError(
            f"{dcp_dir}: tensor {fqn!r} has size {list(size)}: dimensions must be 0 .. 2**62, "
            "their non-zero product times the item size at most 2**62 bytes"
        )
    chunks = md.get("chunks")
    if type(chunks) is not list or any(not isinstance(c, Obj) for c in chunks):
        raise FormatError(f"{dcp_dir}: tensor {fqn!r} needs a list of chunk records, found a {what_is(chunks)}")
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


def _value(dcp_dir: str, fqn: str, r: _Range) -> Any:
    return _torch_value(_blob(dcp_dir, r), dcp_dir, fqn)


def _tensor(dcp_dir: str, fqn: str, dtype: torch.dtype, size: tuple, ranges: list[_Range]) -> torch.Tensor:
    out = torch.zeros(size, dtype=dtype)  # every element is then written: the chunks tile it (checked)
    for r in ranges:
        assert r.box is not None  # _tensor_plan gives every chunk its box
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
            f"names and indexes, found a {what_is(path)}"
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
                f"{where}: item {i} of a path in planner_data is a {what_is(key)} where "
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
            load: Callable[[], Any] = partial(_tensor, dcp_dir, fqn, dtype, size, rs)
        elif md.cls == "BytesStorageMetadata":
            entries = [v for off, v in stored.get(fqn, []) if off is None]
            if len(entries) != 1:
                raise FormatError(f"{mpath}: entry {fqn!r} needs one storage entry, found {len(entries)}")
            rs = [_range(dcp_dir, entries[0], fqn, "the value")]
            load = partial(_value, dcp_dir, fqn, rs[0])
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
