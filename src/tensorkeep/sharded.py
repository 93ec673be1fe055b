"""Sharded model directories in the Hugging Face layout.

``model-00001-of-00003.safetensors`` ... plus ``model.safetensors.index.json``
(``{"metadata": {"total_size": N}, "weight_map": {name: shard file}}``), or a single
``model.safetensors`` when everything fits in one shard — what ``transformers`` writes and reads.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator, Mapping

import torch

from . import _io
from .errors import FormatError
from .files import SafeOpen, TensorSlice, load, write
from .format import TensorInfo, dumps, strict_json

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.I)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


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


def save_sharded(state_dict: Mapping[str, torch.Tensor], directory: "str | os.PathLike[str]", *,
                 max_shard_size: int | str = "5GB", metadata: Mapping[str, str] | None = None,
                 index_metadata: Mapping[str, Any] | None = None) -> list[str]:
    """Write a flat state dict as a sharded directory that ``transformers`` and ``tk.load`` read.

    The directory is built under a temporary name and swapped into place atomically,
    so readers see the old directory or the new one, never a mix. Returns the shard file names.

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
    parent = os.path.dirname(directory)
    _io.makedirs(parent)
    tmp = _io.tmp_path(directory)
    _io.mkdir(tmp)
    try:
        for fname, names in zip(files, shards):
            write({k: state_dict[k] for k in names}, os.path.join(tmp, fname),
                  {"format": "pt", **dict(metadata or {})}, durable=True)
        if n > 1:
            index = {"metadata": {"total_size": sum(_nbytes(t) for t in state_dict.values()), **dict(index_metadata or {})},
                     "weight_map": {k: f for f, names in zip(files, shards) for k in names}}
            with _io.atomic_file(os.path.join(tmp, INDEX)) as fd:
                _io.pwrite_all(fd, memoryview(dumps(index).encode()), 0)
        _io.fsync_dir(tmp)
        _io.replace_dir(tmp, directory)
    except BaseException:
        if os.path.isdir(tmp):
            _io.rmtree(tmp)
        raise
    return files


def _shard_path(directory: str, fname: Any, index_path: str) -> str:
    if type(fname) is not str or not fname or "/" in fname or "\\" in fname or fname in (".", ".."):
        raise FormatError(f"{index_path}: shard file name {fname!r} must be a plain file name in the directory")
    return os.path.join(directory, fname)


def _read_index(directory: str) -> dict[str, str]:
    """name -> shard path, from the index (validated) or a single model.safetensors."""
    index_path = os.path.join(directory, INDEX)
    if os.path.exists(index_path):
        with open(index_path, "rb") as f:
            raw = f.read(100_000_001)
        if len(raw) > 100_000_000:
            raise FormatError(f"{index_path}: index is larger than 100 MB")
        idx = strict_json(raw, index_path)
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict):
            raise FormatError(f"{index_path}: expected an object with a 'weight_map' of tensor name -> shard file")
        out = {name: _shard_path(directory, f, index_path) for name, f in wm.items()}
        for p in set(out.values()):
            if not os.path.isfile(p):
                raise FormatError(f"{index_path}: shard {os.path.basename(p)} is listed but missing from {directory}")
        return out
    single = os.path.join(directory, SINGLE)
    if os.path.isfile(single):
        with SafeOpen(single) as f:
            return {name: single for name in f.keys()}
    found = sorted(os.listdir(directory))[:10]
    hint = (" It looks like a training checkpoint: use tk.CheckpointManager(...).restore(...)."
            if "manifest.json" in found or any(f.startswith("step_") for f in found) else "")
    raise FormatError(f"{directory}: not a model directory: expected {INDEX} or {SINGLE}, found {found}.{hint}")


class ShardedOpen:
    """A sharded directory opened like one file: ``keys()``, ``info``, ``get``, ``get_slice``, ``read_into``."""

    def __init__(self, directory: "str | os.PathLike[str]") -> None:
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

    def read_into(self, name: str, out: torch.Tensor, *, verify: bool = True) -> torch.Tensor:
        return self._for(name).read_into(name, out, verify=verify)

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __enter__(self) -> "ShardedOpen":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load_dir(path: str, *, device: Any = None, lazy: bool = False, verify: bool = True) -> dict[str, Any]:
    """Load a sharded model directory (ours or written by others) as one flat dict."""
    where = _read_index(path)
    out: dict[str, Any] = {}
    loaded: dict[str, Any] = {}
    for shard in dict.fromkeys(where.values()):
        obj = load(shard, device=device, lazy=lazy, verify=verify)
        if not isinstance(obj, dict):
            raise FormatError(f"{shard}: a shard must hold a flat dict of tensors")
        loaded[shard] = obj
    for name, shard in where.items():
        if name not in loaded[shard]:
            raise FormatError(f"{path}: the index puts {name!r} in {os.path.basename(shard)}, which lacks it")
        out[name] = loaded[shard][name]
    return out
