"""Sharded model directories in the Hugging Face layout.

``model-00001-of-00003.safetensors`` ... plus ``model.safetensors.index.json``
(``{"metadata": {"total_size": N}, "weight_map": {name: shard file}}``), or a single
``model.safetensors`` when everything fits in one shard — what ``transformers`` writes and reads.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from tensorkeep.core.format import TK_PREFIX, TensorInfo, dumps, strict_json
from tensorkeep.errors import FormatError, SaveError
from tensorkeep.file.reader import read_file
from tensorkeep.file.safeopen import SafeOpen, TensorSlice
from tensorkeep.file.writer import write
from tensorkeep.storage import local as _io

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.I)
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}


def parse_size(size: int | str) -> int:
    """``"2GB"`` -> 2_000_000_000, ``"500MiB"`` -> 524_288_000, ints unchanged.

    >>> parse_size("2GB"), parse_size("1.5MB"), parse_size(1024)
    (2000000000, 1500000, 1024)
    """
    if isinstance(size, int):
        return size
    m = _SIZE_RE.match(size)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"max_shard_size {size!r}: expected a number of bytes or a size like '2GB' or '500MB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(state_dict: Mapping[str, torch.Tensor], max_shard_size: int | str) -> list[list[str]]:
    """Split names into shards of at most ``max_shard_size`` bytes each, in order (a tensor
    larger than the limit gets a shard of its own, as transformers does)."""
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state_dict.items():
        n = _nbytes(t)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def save_sharded(
    state_dict: Mapping[str, torch.Tensor],
    directory: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    metadata: Mapping[str, str] | None = None,
    index_metadata: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write a flat state dict as a sharded directory that ``transformers`` and ``tk.load`` read.

    Only the weight files are replaced (``model.safetensors``, ``model-0000i-of-0000n.safetensors``
    and the index); a ``config.json``, a tokenizer or anything else in the directory stays as it
    is. Every file is written under a temporary name and fsynced first, then one rename commits,
    so a reader (ours or ``from_pretrained``) finds the old weights or the new ones, whole, at
    every instant, even across a crash. Returns the shard file names.

    >>> import torch, tensorkeep as tk
    >>> tk.save_sharded({"a": torch.zeros(4), "b": torch.ones(4)}, "/tmp/tk-doc-sharded", max_shard_size=16)
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    directory = os.path.abspath(os.fspath(directory))
    for name, t in state_dict.items():
        if type(name) is not str or not isinstance(t, torch.Tensor):
            raise TypeError(f"save_sharded needs a flat dict of str -> tensor; {name!r} is a {type(t).__name__}")
    shards = plan_shards(state_dict, max_shard_size)
    n = len(shards)
    files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f"save_sharded: {directory} exists and is not a directory")
    _io.makedirs(directory)
    old = _Weights.read(directory)
    old.remove_stale(directory)
    temps: dict[str, str] = {}
    try:
        for fname, names in zip(files, shards):
            temps[fname] = _io.tmp_path(os.path.join(directory, fname))
            write(
                {k: state_dict[k] for k in names},
                temps[fname],
                {"format": "pt", **dict(metadata or {})},
                durable=True,
                in_place=True,
            )
        if n > 1:
            index = {
                "metadata": {"total_size": sum(_nbytes(t) for t in state_dict.values()), **dict(index_metadata or {})},
                "weight_map": {k: f for f, names in zip(files, shards) for k in names},
            }
            temps[INDEX] = _write_temp(directory, INDEX, index)
        _commit(directory, files, temps, old)
    except BaseException as e:
        for tmp in temps.values():
            if _io.is_regular_file(tmp):
                _io.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, SaveError):
            raise SaveError(
                e.errno,
                f"save_sharded to {directory} failed: {e}. The weights there are the "
                "previous ones, whole, or the new ones, whole",
            ) from e
        raise
    return files


class _Weights:
    """The weight files a directory holds now: a single file, an index and the shards it names."""

    def __init__(self, single: bool, index: bool, shards: set[str] | None) -> None:
        self.single, self.index, self.shards = single, index, shards  # shards None: the index is unreadable

    @classmethod
    def read(cls, directory: str) -> _Weights:
        index_path = os.path.join(directory, INDEX)
        shards: set[str] | None = set()
        if os.path.lexists(index_path):
            try:
                shards = set(_read_index(directory, prefer_single=False, check=False).values())
                shards = {os.path.basename(p) for p in shards}
            except (FormatError, OSError):
                shards = None
        return cls(os.path.lexists(os.path.join(directory, SINGLE)), os.path.lexists(index_path), shards)

    def remove_stale(self, directory: str) -> None:
        """Remove the leftovers of earlier saves that crashed: temporary files of dead processes, and
        shards named like ours that hold a tensorkeep header but no index names (never user files)."""
        if self.shards is None:
            return  # an unreadable index: nobody can tell what it needs
        for n in os.listdir(directory):
            p = os.path.join(directory, n)
            if n in self.shards or not _io.is_regular_file(p):
                continue
            t = _io.temp_of(n)
            if (
                t is not None
                and _WEIGHT_RE.match(t[0])
                and _io.is_stale_temp(n, directory)
                or t is None
                and _SHARD_RE.match(n)
                and _is_tensorkeep(p)
            ):
                _io.unlink(p)


_WEIGHT_RE = re.compile(r"^model(-\d{5,}-of-\d{5,})?\.safetensors(\.index\.json)?$")
_SHARD_RE = re.compile(r"^model-\d{5,}-of-\d{5,}\.safetensors$")


def _is_tensorkeep(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8 + len(TK_PREFIX))[8:] == TK_PREFIX


def _write_temp(directory: str, name: str, obj: Any) -> str:
    tmp = _io.tmp_path(os.path.join(directory, name))
    with _io.atomic_file(tmp, in_place=True) as fd:
        _io.pwrite_all(fd, memoryview(dumps(obj).encode()), 0)
    return tmp


def _unlink(directory: str, names: set[str] | list[str]) -> None:
    """Unlink these entries (files or symlinks, never a directory), then make that durable."""
    gone = False
    for n in names:
        p = os.path.join(directory, n)
        if _io.is_regular_file(p) or os.path.islink(p):
            _io.unlink(p)
            gone = True
    if gone:
        _io.fsync_dir(directory)


def _droppable(name: str) -> bool:
    """A name save_sharded may delete once no index needs it: a weight file's name (or tensorkeep's
    temporary copy of one). A file an index names under any other name is the user's."""
    t = _io.temp_of(name)
    return bool(_WEIGHT_RE.match(t[0] if t else name))


def _commit(directory: str, files: list[str], temps: dict[str, str], old: _Weights) -> None:
    """Rename the new weight files into place so that one rename is the commit (readers, like
    transformers, prefer ``model.safetensors`` over an index), then retire the old ones."""
    new = set(files)
    old_shards = {n for n in (old.shards or set()) if _droppable(n)}

    def place(names: list[str]) -> None:
        for f in names:
            _io.rename(temps[f], os.path.join(directory, f))
        _io.fsync_dir(directory)

    if files == [SINGLE]:
        place([SINGLE])  # the commit
        _unlink(directory, [INDEX] if old.index else [])
        _unlink(directory, old_shards - new)
        return
    if old.single:  # it is what readers see until it goes: the shards and index can land first
        place(files + [INDEX])
        _unlink(directory, [SINGLE])  # the commit
        _unlink(directory, old_shards - new)
        return
    if old_shards & new:  # the old index names files about to be replaced: point it at copies first
        old_shards = _set_aside(directory, old_shards & new) | (old_shards - new)
    place(files)
    place([INDEX])  # the commit
    _unlink(directory, old_shards - new)


def _set_aside(directory: str, names: set[str]) -> set[str]:
    """Link (or copy) each of ``names`` to a temporary name and rewrite the index to use those, so
    the old weights stay whole while their names are replaced; returns the temporary names. An
    entry whose file is missing already (a damaged directory) is dropped from that index."""
    aside: dict[str, str] = {}
    try:
        for f in sorted(names):
            src = os.path.join(directory, f)
            if _io.is_regular_file(src) or (os.path.islink(src) and os.path.isfile(src)):
                aside[f] = os.path.basename(_io.tmp_path(src))
                _link_or_copy(src, os.path.join(directory, aside[f]))
        idx = _read_index_json(os.path.join(directory, INDEX))
        idx["weight_map"] = {k: aside.get(v, v) for k, v in idx["weight_map"].items() if v not in names or v in aside}
        _io.rename(_write_temp(directory, INDEX, idx), os.path.join(directory, INDEX))
        _io.fsync_dir(directory)
    except BaseException:
        for a in aside.values():  # the index does not name them yet: they are only ours
            if _io.is_regular_file(os.path.join(directory, a)):
                _io.unlink(os.path.join(directory, a))
        raise
    _unlink(directory, names)
    return set(aside.values())


def _link_or_copy(src: str, dst: str) -> None:
    """``dst`` names the same bytes as ``src`` (a hard link; a durable copy where links are refused)."""
    try:
        _io.link(src, dst)
        return
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    with open(src, "rb") as f, _io.atomic_file(dst, in_place=True) as fd:
        pos = 0
        while chunk := f.read(16 << 20):
            _io.pwrite_all(fd, memoryview(chunk), pos)
            pos += len(chunk)


def _shard_path(directory: str, fname: Any, index_path: str) -> str:
    if type(fname) is not str or not fname or "/" in fname or "\\" in fname or fname in (".", ".."):
        raise FormatError(f"{index_path}: shard file name {fname!r} must be a plain file name in the directory")
    return os.path.join(directory, fname)


def _read_index_json(index_path: str) -> dict[str, Any]:
    if not os.path.isfile(index_path):  # a FIFO would block open() forever
        raise FormatError(f"{index_path}: not a regular file")
    with open(index_path, "rb") as f:
        raw = f.read(100_000_001)
    if len(raw) > 100_000_000:
        raise FormatError(f"{index_path}: index is larger than 100 MB")
    idx = strict_json(raw, index_path)
    if not isinstance(idx, dict) or not isinstance(idx.get("weight_map"), dict):
        raise FormatError(f"{index_path}: expected an object with a 'weight_map' of tensor name -> shard file")
    return idx


def _read_index(directory: str, *, prefer_single: bool = True, check: bool = True) -> dict[str, str]:
    """name -> shard path, from a single model.safetensors or else the index (validated) — the order
    transformers uses, so both read the same weights while a save replaces them."""
    index_path = os.path.join(directory, INDEX)
    single = os.path.join(directory, SINGLE)
    if prefer_single and os.path.isfile(single):
        with SafeOpen(single) as f:
            return {name: single for name in f}
    if os.path.exists(index_path):
        wm = _read_index_json(index_path)["weight_map"]
        out = {name: _shard_path(directory, f, index_path) for name, f in wm.items()}
        for p in set(out.values()) if check else ():
            if not os.path.isfile(p):
                raise FormatError(f"{index_path}: shard {os.path.basename(p)} is listed but missing from {directory}")
        return out
    found = sorted(os.listdir(directory))[:10]
    hint = (
        " It looks like a training checkpoint: use tk.CheckpointManager(...).restore(...)."
        if "manifest.json" in found or any(f.startswith("step_") for f in found)
        else ""
    )
    raise FormatError(f"{directory}: not a model directory: expected {INDEX} or {SINGLE}, found {found}.{hint}")


class ShardedOpen:
    """A sharded directory opened like one file: ``keys()``, ``info``, ``get``, ``get_slice``, ``read_into``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = os.fspath(directory)
        self._where = _read_index(self.path)
        self._open: dict[str, SafeOpen] = {}
        self.metadata: dict[str, str] = {}
        first = next(iter(self._where.values()), None)
        if first is not None:
            self.metadata = dict(self._file(first).metadata)

    def _file(self, shard: str) -> SafeOpen:
        if shard not in self._open:
            self._open[shard] = SafeOpen(shard)
        return self._open[shard]

    def _for(self, name: str) -> SafeOpen:
        if name not in self._where:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        f = self._file(self._where[name])
        if name not in f:
            raise FormatError(f"{self.path}: the index puts {name!r} in {os.path.basename(f.path)}, which lacks it")
        return f

    def keys(self) -> list[str]:
        return list(self._where)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def info(self, name: str) -> TensorInfo:
        return self._for(name).info(name)

    def get(self, name: str, *, verify: bool = True) -> Any:
        return self._for(name).get(name, verify=verify)

    def get_slice(self, name: str) -> TensorSlice:
        return self._for(name).get_slice(name)

    def read_into(self, name: str, out: torch.Tensor, *, verify: bool = True, atomic: bool = True) -> torch.Tensor:
        """:meth:`SafeOpen.read_into` on the shard that holds ``name``: after any error ``out`` is unchanged."""
        return self._for(name).read_into(name, out, verify=verify, atomic=atomic)

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __enter__(self) -> ShardedOpen:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load_dir(path: str, *, device: Any = None, lazy: bool = False, verify: bool = True) -> dict[str, Any]:
    """Load a sharded model directory (ours or written by others) as one flat dict."""
    where = _read_index(path)
    out: dict[str, Any] = {}
    loaded: dict[str, Any] = {}
    for shard in dict.fromkeys(where.values()):
        obj = read_file(shard, device=device, lazy=lazy, verify=verify)
        if not isinstance(obj, dict):
            raise FormatError(f"{shard}: a shard must hold a flat dict of tensors")
        loaded[shard] = obj
    for name, shard in where.items():
        if name not in loaded[shard]:
            raise FormatError(f"{path}: the index puts {name!r} in {os.path.basename(shard)}, which lacks it")
        out[name] = loaded[shard][name]
    return out
