"""Writing one file: the save side of :mod:`tensorkeep.file.reader`.

A file is written to a temporary name (or in place inside a directory that is published
later), with CRC-32 checksums computed while the bytes are staged; large files go through
reused page-aligned buffers with ``O_DIRECT``, overlapping the copy with the write.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from tensorkeep import knobs, threads
from tensorkeep.core.dtypes import byte_view, name_of_numpy, name_of_torch
from tensorkeep.core.format import (
    CRC_FIELD_END,
    CRC_KEY,
    CRC_PLACEHOLDER,
    DTYPE_SIZES,
    FORMAT_VERSION,
    TK_KEY,
    TK_PREFIX,
    crc32,
    crc_field,
    dumps,
    encode_header,
    header_crc,
)
from tensorkeep.core.tree import flatten
from tensorkeep.storage import Backend, resolve
from tensorkeep.storage import local as _io

_VIA_NUMPY = frozenset({"BOOL", "U8", "I8", "I16", "F16", "I32", "F32", "I64", "F64", "C64"})


def _source(x: Any, path: str, name: str) -> tuple[str, tuple[int, ...], Callable[[], np.ndarray]]:
    """(dtype name, shape, function returning the bytes as a flat uint8 array). Copies happen
    per tensor at write time (device to host, non-contiguous), never for the whole state at once."""
    if isinstance(x, torch.Tensor):
        dt = name_of_torch(x.dtype)
        if dt is None:
            raise TypeError(f"cannot save {path}: tensor {name!r} has dtype {x.dtype}, which safetensors cannot store")

        def get_t() -> np.ndarray:
            t = x.detach()
            if dt in _VIA_NUMPY and t.is_cpu and t.is_contiguous() and not t.is_conj() and not t.is_neg():
                return t.numpy().reshape(-1).view(np.uint8)  # the common case, a few torch calls fewer
            if t.device.type != "cpu":
                t = t.cpu()
            return byte_view(t.resolve_conj().resolve_neg().contiguous()).numpy()

        return dt, tuple(x.shape), get_t
    dt = name_of_numpy(x.dtype)
    if dt is None:
        raise TypeError(f"cannot save {path}: array {name!r} has NumPy dtype {x.dtype}, which safetensors cannot store")

    def get_n() -> np.ndarray:
        a = np.ascontiguousarray(x)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        return a.reshape(-1).view(np.uint8)

    return dt, tuple(x.shape), get_n


def _block_crcs(buf: np.ndarray, block: int) -> list[str]:
    mv = memoryview(buf)  # type: ignore[arg-type]  # numpy's stubs: ndarray.__buffer__ only on Python >= 3.12
    return [f"{crc32(mv[i : i + block]):08x}" for i in range(0, max(len(mv), 1), block)]


def _nblocks(nbytes: int, block: int) -> int:
    return max(1, -(-nbytes // block))


def _write_buffered(fd: int, start: int, sources: list, block: int) -> dict[str, list[str]]:
    crcs, off = {}, start
    for name, get in sources:
        buf = get()
        crcs[name] = _block_crcs(buf, block)
        _io.pwrite_all(fd, memoryview(buf), off)
        off += buf.nbytes
    return crcs


def _write_direct(fd: int, start: int, sources: list, block: int, total: int) -> dict[str, list[str]]:
    """Stage through reused page-aligned buffers: the main thread copies and checksums
    one buffer while a writer thread writes the other with O_DIRECT."""
    chunk = knobs.CHUNK_BYTES
    bufs = [_io.STAGING.get(chunk), _io.STAGING.get(chunk)]
    crcs: dict[str, list[str]] = {}
    pending: list[Future[None] | None] = [None, None]
    cur, fill, off = 0, 0, start
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="tk-write") as pool:

            def flush(length: int) -> None:
                nonlocal cur, fill, off
                pending[cur] = threads.submit(pool, _io.pwrite_all, fd, memoryview(bufs[cur])[:length], off)
                off += length
                cur, fill = 1 - cur, 0
                other = pending[cur]
                if other is not None:
                    other.result()  # the other buffer must be written before we refill it
                    pending[cur] = None

            for name, get in sources:
                src = get()
                crcs[name] = _block_crcs(src, block)
                mv, pos = memoryview(src), 0
                while pos < len(mv):
                    n = min(chunk - fill, len(mv) - pos)
                    bufs[cur][fill : fill + n] = mv[pos : pos + n]
                    fill, pos = fill + n, pos + n
                    if fill == chunk:
                        flush(chunk)
            if fill:
                padded = -(-fill // knobs.ALIGN) * knobs.ALIGN
                bufs[cur][fill:padded] = bytes(padded - fill)
                flush(padded)
            for p in pending:
                if p is not None:
                    p.result()
        _io.ftruncate(fd, start + total)
    finally:
        for b in bufs:
            _io.STAGING.put(b)
    return crcs


def save(
    obj: Any, path: str | os.PathLike[str], *, metadata: Mapping[str, str] | None = None, durable: bool = True
) -> None:
    """Save a tensor, array, or any nesting of dict/list/tuple of them and plain values.

    The file is a safetensors file with tensorkeep's structure and checksums in its
    metadata. It is written to a temporary file, fsynced, renamed over ``path`` and
    the directory fsynced (``durable=False`` skips the fsyncs, for scratch files).

    >>> import torch, tensorkeep as tk
    >>> tk.save({"w": torch.ones(2), "step": 3}, "/tmp/tk-doc.tk")
    >>> tk.load("/tmp/tk-doc.tk")
    {'w': tensor([1., 1.]), 'step': 3}
    """
    path = os.fspath(path)  # a URL (s3://bucket/key, memory://…) is written as one object, see tensorkeep.file.remote
    user = dict(metadata or {})
    for k, v in user.items():
        if type(k) is not str or type(v) is not str:
            raise TypeError(f"metadata must map str to str; got {k!r}: {type(v).__name__}")
        if k.startswith(TK_KEY):
            raise ValueError(f"metadata key {k!r}: keys starting with 'tensorkeep' are reserved")
    write(obj, path, user, durable)


def write(obj: Any, path: str, user: dict[str, str], durable: bool, *, in_place: bool = False) -> tuple[int, str]:
    """:func:`save` without the check on reserved metadata keys (for tensorkeep's own modules).
    Returns the file's size and its header checksum (what a manifest records of it).

    ``in_place=True``: write a new file directly at ``path`` (see ``_io.atomic_file``).
    An object in a store (``s3://…``) is streamed whole instead (:func:`_write_object`)."""
    backend, key = resolve(path)
    if not backend.local:
        return _write_object(obj, backend, key, user)
    entries, info, meta, total = plan(obj, path, user, placeholder=False)
    if _small(total):  # header and data assembled in memory, one write
        return write_image(_image(entries, info, meta, total), path, durable, in_place=in_place)
    meta[TK_KEY] = _dumps_tree(info)  # the placeholder record: its length fixes where the data starts
    block = info["block"]
    direct = hasattr(os, "O_DIRECT") and total >= knobs.DIRECT_IO_MIN_BYTES
    align = knobs.ALIGN if direct else 8
    layout = [(n, dt, sh) for n, dt, sh, _ in entries]
    head, _ = encode_header(layout, meta, align)
    sources = [(n, get) for n, _, _, get in entries]
    with _io.atomic_file(path, durable=durable, direct=direct, in_place=in_place) as fd:
        if direct and _io.fd_is_direct(fd):
            info["crc"] = _write_direct(fd, len(head), sources, block, total)
        else:
            info["crc"] = _write_buffered(fd, len(head), sources, block)
        final = final_header(layout, meta, info, align, len(head))
        if direct and _io.fd_is_direct(fd):
            buf = _io.STAGING.get(len(final))
            try:
                buf[:] = final
                _io.pwrite_all(fd, memoryview(buf), 0)
            finally:
                _io.STAGING.put(buf)
        else:
            _io.pwrite_all(fd, memoryview(final), 0)
    return len(head) + total, crc_field(final)


def _write_object(obj: Any, backend: Backend, key: str, user: dict[str, str]) -> tuple[int, str]:
    """Write ``obj`` as one object (the header leads it, so the checksums are computed first: a
    tensor on a GPU is copied to the host twice); returns its size and header checksum."""
    entries, info, meta, total = plan(obj, key, user)
    layout = [(n, dt, sh) for n, dt, sh, _ in entries]
    head, _ = encode_header(layout, meta, 8)
    info["crc"] = {n: _block_crcs(get(), info["block"]) for n, _, _, get in entries}
    final = final_header(layout, meta, info, 8, len(head))

    def chunks() -> Any:
        yield final
        for _, _, _, get in entries:
            yield get()

    backend.write(key, chunks(), len(final) + total)
    return len(final) + total, crc_field(final)


class FileImage(bytearray):
    """The complete bytes of a small file (header and data), built by :func:`image`."""


def image(obj: Any, path: str, user: dict[str, str]) -> FileImage | None:
    """The bytes :func:`write` would put in the file, or None unless its tensors total less than
    ``knobs.ONE_WRITE_BYTES`` (such files are written piece by piece). Copies every tensor now:
    an asynchronous checkpoint builds these in ``save()`` and leaves only syscalls to its writer."""
    entries, info, meta, total = plan(obj, path, user, placeholder=False)
    return _image(entries, info, meta, total) if _small(total) else None


def _small(total: int) -> bool:
    return total < knobs.ONE_WRITE_BYTES and total < knobs.DIRECT_IO_MIN_BYTES


def _image(entries: list, info: dict[str, Any], meta: dict[str, str], total: int) -> FileImage:
    bufs = [(name, get()) for name, _, _, get in entries]
    info["crc"] = {name: _block_crcs(buf, info["block"]) for name, buf in bufs}
    final = final_header([(n, dt, sh) for n, dt, sh, _ in entries], meta, info, 8)
    whole = FileImage(len(final) + total)
    whole[: len(final)] = final
    off = len(final)
    for _, buf in bufs:
        whole[off : off + buf.nbytes] = memoryview(buf)
        off += buf.nbytes
    return whole


def write_image(img: FileImage, path: str, durable: bool, *, in_place: bool = False) -> tuple[int, str]:
    """Write what :func:`image` built, atomically like :func:`write`; returns size and header checksum."""
    with _io.atomic_file(path, durable=durable, in_place=in_place) as fd:
        _io.pwrite_all(fd, memoryview(img), 0)
    return len(img), crc_field(img[:CRC_FIELD_END])


def plan(
    obj: Any, path: str, user: dict[str, str], *, placeholder: bool = True
) -> tuple[list, dict[str, Any], dict[str, str], int]:
    """The tensors of ``obj`` in file order ``[(name, dtype, shape, get_bytes)]``, the tensorkeep
    record (checksums still placeholders), the header metadata and the data size in bytes.
    ``placeholder=False`` leaves the record out of the metadata (:func:`final_header` puts it in)."""
    tree, leaves = flatten(obj)
    entries = [(name, *_source(x, path, name)) for name, x in leaves]
    entries.sort(key=lambda e: -DTYPE_SIZES[e[1]])  # larger items first keeps every tensor aligned
    block = knobs.BLOCK_BYTES
    info: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "block": block,
        "tree": tree,
        "crc": {n: [CRC_PLACEHOLDER] * _nblocks(_nbytes(dt, sh), block) for n, dt, sh, _ in entries},
    }
    meta = {CRC_KEY: CRC_PLACEHOLDER, TK_KEY: _dumps_tree(info) if placeholder else "", **user}
    total = sum(_nbytes(dt, sh) for _, dt, sh, _ in entries)
    return entries, info, meta, total


def final_header(
    layout: list, meta: dict[str, str], info: dict[str, Any], align: int, length: int | None = None
) -> bytearray:
    """The header with the real checksums in ``info`` and its own checksum; as long as the
    placeholder one (``length``) when one was written."""
    meta[TK_KEY] = _dumps_tree(info)
    head, _ = encode_header(layout, meta, align)
    assert length is None or len(head) == length, "header length changed between placeholder and final write"
    final = bytearray(head)
    at = 8 + len(TK_PREFIX)
    final[at : at + 8] = f"{header_crc(final):08x}".encode()
    return final


def _dumps_tree(info: dict[str, Any]) -> str:
    """The structure as JSON; strings holding lone surrogates (valid Python str, invalid UTF-8)
    are kept as \\ud800 escapes so the header stays UTF-8."""
    text = dumps(info)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(info, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    return n
