"""Reading only what is asked for: :class:`SafeOpen` (``tk.open``), one tensor or a slice at a time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from tensorkeep.core.dtypes import torch_dtype
from tensorkeep.core.format import TensorInfo
from tensorkeep.file.reader import _Reader, open_reader
from tensorkeep.file.torchfile import load_torch_file


class TensorSlice:
    """A tensor in a file, sliced on demand: ``f.get_slice("w")[2:5]`` reads only rows 2..4."""

    def __init__(self, reader: _Reader, name: str) -> None:
        self._r, self._name = reader, name
        self._info = reader.header.tensors[name]
        self.shape = self._info.shape
        self.dtype = self._info.dtype

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        return self.dtype

    def __getitem__(self, key: Any) -> Any:
        key = key if isinstance(key, tuple) else (key,)
        t, r = self._info, self._r
        if not t.shape or not key or key[0] is Ellipsis:
            return r.read(self._name, r.kinds[self._name], True)[key]
        k0, dim0 = key[0], t.shape[0]
        if isinstance(k0, int):
            i = k0 + dim0 if k0 < 0 else k0
            if not 0 <= i < dim0:
                raise IndexError(f"index {k0} is out of range for dimension 0 of size {dim0} ({self._name!r})")
            lo, hi, rest = i, i + 1, (0, *key[1:])
        elif isinstance(k0, slice):
            idx = range(*k0.indices(dim0))
            if idx.step < 0:
                raise ValueError("get_slice: negative steps are not supported (torch slicing has none either)")
            lo, hi = (idx[0], idx[-1] + 1) if len(idx) else (0, 0)
            rest = (slice(0, hi - lo, idx.step), *key[1:])
        else:
            raise TypeError(f"get_slice supports ints and slices on the first dimension, got {k0!r}")
        row = t.nbytes // dim0 if dim0 else 0
        kind = r.kinds[self._name]
        x, buf = r._empty(t, kind, rows=hi - lo)
        if row and hi > lo:
            b0, b1 = lo * row, hi * row
            if r.crcs is None:
                r.read_range(buf, r.header.data_start + t.begin + b0)
            else:  # read whole checksum blocks so everything returned is verified
                k, end = b0 // r.block, min(-(-b1 // r.block) * r.block, t.nbytes)
                raw = np.empty(end - k * r.block, np.uint8)
                r.read_range(raw, r.header.data_start + t.begin + k * r.block)
                r.check(self._name, raw, k)
                buf[:] = raw[b0 - k * r.block : b1 - k * r.block]
        return x[rest]


class SafeOpen:
    """A file opened for reading only what is asked for. Use :func:`open`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._r = open_reader(self.path)
        self._all: dict[str, Any] | None = None
        if self._r.torch_pickle:
            obj = load_torch_file(self.path, None, False, None if self._r.src.mappable else self._r.src.whole())
            self._all = obj if isinstance(obj, dict) else {"tensor": obj}
            self.metadata: dict[str, str] = {}
        else:
            self.metadata = self._r.metadata

    def keys(self) -> list[str]:
        """Tensor names in the file (nested structures are flattened with dots)."""
        return list(self._all) if self._all is not None else list(self._r.header.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, name: object) -> bool:
        return name in (self._all if self._all is not None else self._r.header.tensors)

    def __len__(self) -> int:
        return len(self.keys())

    def info(self, name: str) -> TensorInfo:
        """dtype, shape and byte range of one tensor, without reading it."""
        return self._r.header.tensors[self._check(name)]

    def _check(self, name: str) -> str:
        if name not in (self._all if self._all is not None else self._r.header.tensors):
            close = ", ".join(sorted(self.keys())[:10])
            raise KeyError(f"{self.path}: no tensor named {name!r}; it has: {close}{' ...' if len(self) > 10 else ''}")
        return name

    def get(self, name: str, *, verify: bool = True, lazy: bool = False) -> Any:
        """Read one tensor (verified), and nothing else of the file.

        ``lazy=True`` maps it instead, like ``tk.load(lazy=True)``: no copy, and the checksums
        are checked through the mapping (skip that too with ``verify=False``). The tensor stays
        valid after the file is closed; writes to it never reach the file. It is verified once:
        see :func:`load` for what a mapping cannot protect against (a file changed in place).

        >>> import torch, tensorkeep as tk
        >>> tk.save({"w": torch.ones(3), "b": torch.zeros(2)}, "/tmp/tk-doc-get.tk")
        >>> with tk.open("/tmp/tk-doc-get.tk") as f:
        ...     f.get("w"), f.get("b", lazy=True)
        (tensor([1., 1., 1.]), tensor([0., 0.]))
        """
        self._check(name)
        if self._all is not None:
            return self._all[name]
        if lazy:
            return self._r.map_one(name, self._r.kinds[name], verify)
        return self._r.read(name, self._r.kinds[name], verify)

    get_tensor = get  # safetensors' spelling

    def read_into(self, name: str, out: torch.Tensor, *, verify: bool = True, atomic: bool = True) -> torch.Tensor:
        """Read tensor ``name`` into ``out`` (same dtype and shape), verified; returns ``out``.

        ``out`` is written only once the whole tensor has been read and verified (through a
        temporary, one extra copy): after any error it is unchanged. ``atomic=False`` reads a
        contiguous CPU ``out`` in place, with no temporary, for callers that keep their own copy
        of the old values: after a ``ChecksumError`` it then holds the damaged bytes.

        >>> import torch, tensorkeep as tk
        >>> tk.save({"w": torch.arange(3.0)}, "/tmp/tk-doc-read-into.tk")
        >>> with tk.open("/tmp/tk-doc-read-into.tk") as f:
        ...     f.read_into("w", torch.zeros(3))
        tensor([0., 1., 2.])
        """
        self._check(name)
        src = self._all[name] if self._all is not None else None
        if src is not None and not isinstance(src, torch.Tensor):
            raise TypeError(f"{self.path}: {name!r} is a {type(src).__name__}, not a tensor")
        dt, shape = (
            (src.dtype, tuple(src.shape))
            if src is not None
            else (torch_dtype(self._r.header.tensors[name].dtype), self._r.header.tensors[name].shape)
        )
        if dt != out.dtype or tuple(out.shape) != shape:
            raise ValueError(f"{self.path}: {name!r} is {dt} {list(shape)}, out is {out.dtype} {list(out.shape)}")
        if src is not None:
            return out.copy_(src)
        direct = out.device.type == "cpu" and out.is_contiguous() and not out.requires_grad
        if atomic or not direct or out.reshape(-1).stride(0) != 1:
            return out.copy_(self._r.read(name, "t", verify))
        self._r.read_split(name, out.reshape(-1).view(torch.uint8).numpy(), verify)
        return out

    def get_slice(self, name: str) -> TensorSlice:
        """A view that reads only the rows an index asks for: ``f.get_slice("w")[2:5]``."""
        self._check(name)
        if self._all is not None:
            raise TypeError(f"{self.path}: slicing is for safetensors files; use get() on a torch file")
        return TensorSlice(self._r, name)

    def load(self, *, device: Any = None, verify: bool = True) -> Any:
        """The whole saved object, as :func:`load` returns it."""
        if self._all is not None:
            return self._all
        return self._r.build(self._r.read_all(verify), device)

    def close(self) -> None:
        self._r.close()

    def __enter__(self) -> SafeOpen:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open(path: str | os.PathLike[str]) -> SafeOpen:
    """Open a file to read single tensors or slices without reading the rest.

    >>> import torch, tensorkeep as tk
    >>> tk.save({"w": torch.arange(10)}, "/tmp/tk-doc-open.tk")
    >>> with tk.open("/tmp/tk-doc-open.tk") as f:
    ...     f.keys(), f.get_slice("w")[2:5]
    (['w'], tensor([2, 3, 4]))
    """
    return SafeOpen(path)
