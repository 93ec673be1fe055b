"""save / load / open on one file: verified and lazy reads (the write side is :mod:`tensorkeep.file.writer`)."""

from __future__ import annotations

import mmap
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from tensorkeep import knobs

from tensorkeep.core import ptzip
from tensorkeep.core.dtypes import numpy_dtype, torch_dtype
from tensorkeep.errors import ChecksumError, FormatError, LimitError, TensorkeepError
from tensorkeep.core.format import (
    CRC_KEY, DTYPE_SIZES, FORMAT_VERSION, TK_KEY, TK_PREFIX, TensorInfo, crc32, header_length,
    looks_like_tensorkeep, parse_checksums, parse_header, strict_json, check_json_values,
)
from tensorkeep.storage.objects import is_url
from tensorkeep.core.tree import check_nesting, leaf_kinds, unflatten

from tensorkeep.file.writer import save, write  # noqa: F401 - re-exported: tensorkeep.file.reader is the one-file API


class UnsafePickleError(FormatError):
    """A ``.pt`` file needs code (a class, a function) to load; tensorkeep never runs it."""


# ----------------------------------------------------------------------------- read

_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _torch_file(path: str, device: Any, lazy: bool, source: Any = None, *, verify: bool = True) -> Any:
    """``torch.load(weights_only=True)`` of ``path`` (or of ``source``, a BytesIO holding its bytes).

    Before torch runs the pickle, it is scanned (``ptzip.check_pickle``: nothing a file can make
    torch's unpickler hash for ever or crash on); what torch returns is then walked once, bounded
    (``tree.check_nesting``: depth, and values counting shared containers at each use).
    ``verify`` checks the CRC-32 the zip archive stores for each entry (torch does not):
    eagerly, each entry as torch reads it; for ``lazy`` (``mmap=True``), all of them up front
    through a read-only mapping whose pages torch's mapping then shares. A legacy (non-zip)
    torch file has no checksums, and cannot be mapped: it is read eagerly, unchecked.
    """
    loc = device or "cpu"
    f: ptzip.CheckedFile | None = None
    try:
        if source is not None:
            ptzip.check_buffer(path, source.getbuffer(), crcs=verify)
            obj = torch.load(source, map_location=loc, weights_only=True)
        else:
            f = ptzip.CheckedFile(path, deflated_ok=not verify)
            f.check_pickle()
            if not verify:
                obj = torch.load(path, map_location=loc, weights_only=True, mmap=lazy or None)
            elif f.legacy:
                obj = torch.load(path, map_location=loc, weights_only=True)
            elif lazy:
                f.check_all_mapped()
                obj = torch.load(path, map_location=loc, weights_only=True, mmap=True)
            else:
                obj = torch.load(f, map_location=loc, weights_only=True, mmap=False)  # a file object cannot be mapped
                f.check_rest()
        check_nesting(obj, path)
        return obj
    except TensorkeepError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ...
        if f is not None and not f.legacy and verify:
            f.check_rest()  # damage explains a failure better than torch's message does
        msg = str(e)
        m = _GLOBAL_RE.search(msg)
        if m or "Weights only load failed" in msg:
            what = m.group(1) if m else "a Python object"
            raise UnsafePickleError(
                f"{path}: this pickle needs {what} to load, so it holds Python objects (for example a whole "
                "model saved with torch.save(net)), not only tensors. Loading it would run code from the file, "
                "so tensorkeep refuses. Fix: save only the parameters, torch.save(net.state_dict(), path) or "
                "tk.save(net.state_dict(), path), and rebuild the model in code before tk.load_into(net, path); "
                "or use tk.save_model(net, path, config=...) to keep the architecture safely. If you trust this "
                "file's source, convert it once yourself: net = torch.load(path, weights_only=False); "
                "tk.save(net.state_dict(), 'model.safetensors')."
            ) from None
        raise FormatError(f"{path}: not a readable torch file ({type(e).__name__}: {msg[:300]})") from None
    finally:
        if f is not None:
            f.close()


class _Reader:
    """An open tensorkeep or safetensors file: validated header, tensor reads, verification."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._map: mmap.mmap | None = None  # made by the first map_one; tensors over it keep it alive
        self.fd = ptzip.open_regular(path)  # a FIFO is refused, not waited on
        try:
            self.size = os.fstat(self.fd).st_size
            self._open(lambda n, at: os.pread(self.fd, n, at))
        except BaseException:
            os.close(self.fd)
            raise

    def _open(self, pread: Callable[[int, int], bytes]) -> None:
        """Tell a torch pickle from a safetensors file and validate the header, reading with ``pread(n, at)``."""
        first = pread(8 + len(TK_PREFIX), 0)
        # a safetensors header length is followed by '{'; only files that do not look like that may be pickles
        st_like = first[8:9] == b"{" or looks_like_tensorkeep(first)
        self.torch_pickle = not st_like and (
            first[:4] == b"PK\x03\x04" or (first[:1] == b"\x80" and first[1:2] in b"\x02\x03\x04\x05"))
        if self.torch_pickle:
            return
        try:
            n = header_length(first, self.size, self.path)
            self.header = parse_header(first[:8] + pread(n, 8), self.size, self.path)
            self._parse_tk()
            if not self.header.is_tensorkeep and looks_like_tensorkeep(first):
                # damage to the first bytes and to the "tensorkeep" key must not make it a plain, unchecked file
                raise FormatError(f"{self.path}: header starts like a tensorkeep header but is not one")
        except FormatError as e:
            if looks_like_tensorkeep(first) and not isinstance(e, (ChecksumError, LimitError)):
                raise ChecksumError(f"{e} (the file is a damaged tensorkeep file)") from None
            raise

    def torch_source(self) -> Any:
        """What ``torch.load`` reads for a torch pickle: None means ``self.path``."""
        return None

    def _parse_tk(self) -> None:
        h = self.header
        self.crcs: Mapping[str, list[int]] | None = None
        self.kinds = {n: "t" for n in h.tensors}
        self.tree: Any = None
        self.block = 0
        self.metadata = dict(h.metadata or {})
        if not h.is_tensorkeep:
            if TK_KEY in self.metadata or CRC_KEY in self.metadata:
                raise FormatError(f"{self.path}: header has tensorkeep metadata in the wrong place")
            return
        record = self.metadata.pop(TK_KEY)
        check_json_values(record.encode("utf-8", "surrogatepass"), f"{self.path}: tensorkeep metadata")
        info = strict_json(record, f"{self.path}: tensorkeep metadata")
        self.metadata.pop(CRC_KEY)
        if not isinstance(info, dict) or set(info) != {"v", "block", "tree", "crc"}:
            raise FormatError(f"{self.path}: tensorkeep metadata must have exactly v, block, tree, crc")
        if info["v"] != FORMAT_VERSION:
            raise FormatError(f"{self.path}: written by a newer tensorkeep (format {info['v']!r}); upgrade tensorkeep")
        self.block = info["block"]
        self.crcs = parse_checksums(info["crc"], info["block"], h, self.path)
        self.tree = info["tree"]
        kinds = leaf_kinds(self.tree, self.path)
        unflatten(self.tree, None, self.path)  # every node checked now, so verify reports what load would refuse
        if set(kinds) != set(h.tensors):
            raise FormatError(f"{self.path}: stored structure does not refer to exactly the file's tensors")
        for name, kind in kinds.items():
            if kind == "n" and numpy_dtype(h.tensors[name].dtype) is None:
                raise FormatError(f"{self.path}: NumPy array {name!r} has dtype {h.tensors[name].dtype} that NumPy lacks")
        self.kinds = kinds

    def close(self) -> None:
        self._map = None  # not closed: tensors over it may outlive the reader
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- verification
    def check(self, name: str, buf: Any, first_block: int = 0) -> None:
        """Verify ``buf``: the bytes of ``name`` starting at block ``first_block``."""
        if self.crcs is None:
            return
        want = self.crcs[name]
        mv = memoryview(buf).cast("B") if not isinstance(buf, np.ndarray) else memoryview(buf)
        for i, at in enumerate(range(0, max(len(mv), 1), self.block)):
            got = crc32(mv[at : at + self.block])
            if got != want[first_block + i]:
                raise ChecksumError(
                    f"{self.path}: tensor {name!r} is damaged (checksum of bytes {(first_block + i) * self.block}.. "
                    f"is {got:08x}, stored {want[first_block + i]:08x}). The file changed after it was written "
                    "(disk, copy or transfer error); use a backup or an earlier checkpoint"
                )

    # -- reads
    def _empty(self, t: TensorInfo, kind: str, rows: int | None = None) -> tuple[Any, np.ndarray]:
        shape = t.shape if rows is None else (rows, *t.shape[1:])
        if kind == "n":
            arr = np.empty(shape, numpy_dtype(t.dtype))
            return arr, arr.reshape(-1).view(np.uint8)
        x = torch.empty(shape, dtype=torch_dtype(t.dtype))
        return x, x.reshape(-1).view(torch.uint8).numpy()

    def read_range(self, buf: np.ndarray, offset: int) -> None:
        mv = memoryview(buf)
        while len(mv):
            n = os.preadv(self.fd, [mv], offset)
            if n <= 0:
                raise ChecksumError(f"{self.path}: file is truncated (read at byte {offset} returned nothing)")
            mv, offset = mv[n:], offset + n

    def read_verified(self, name: str, buf: np.ndarray, first_block: int, verify: bool) -> None:
        """Read ``buf`` (whole checksum blocks of ``name`` from ``first_block`` on) and verify it.

        Each block is read in small pieces and checksummed while the piece is still in the
        CPU cache, so verification costs almost nothing on top of the copy."""
        t = self.header.tensors[name]
        base = self.header.data_start + t.begin + first_block * self.block
        if not verify or self.crcs is None:
            return self.read_range(buf, base)
        piece = knobs.READ_PIECE_BYTES
        mv = memoryview(buf)
        for i, at in enumerate(range(0, max(len(mv), 1), self.block)):
            crc = 0
            for p in range(at, min(at + self.block, len(mv)), piece):
                part = mv[p : min(p + piece, at + self.block, len(mv))]
                self.read_range(part, base + p)
                crc = crc32(part, crc)
            want = self.crcs[name][first_block + i]
            if crc != want:
                raise ChecksumError(
                    f"{self.path}: tensor {name!r} is damaged (checksum of bytes {(first_block + i) * self.block}.. "
                    f"is {crc:08x}, stored {want:08x}). The file changed after it was written "
                    "(disk, copy or transfer error); use a backup or an earlier checkpoint"
                )

    def read(self, name: str, kind: str, verify: bool) -> Any:
        x, buf = self._empty(self.header.tensors[name], kind)
        self.read_verified(name, buf, 0, verify)
        return x

    def read_all(self, verify: bool) -> dict[str, Any]:
        """Read every tensor; work is split into checksum-block-aligned tasks over IO_THREADS threads."""
        out, tasks = {}, []
        span = max(1, knobs.TASK_BYTES // self.block) * self.block if self.block else knobs.TASK_BYTES
        for name, t in self.header.tensors.items():
            x, buf = self._empty(t, self.kinds[name])
            out[name] = x
            for at in range(0, max(t.nbytes, 1), span):
                tasks.append((name, buf[at : at + span], at))
        if knobs.IO_THREADS < 2 or len(tasks) < 2 or self.size <= knobs.TASK_BYTES:  # threads cost ~1 ms to start
            for task in tasks:
                self._read_task(task, verify)
        else:
            with ThreadPoolExecutor(knobs.IO_THREADS, thread_name_prefix="tk-read") as pool:
                list(pool.map(lambda task: self._read_task(task, verify), tasks))
        return out

    def _read_task(self, task: tuple, verify: bool) -> None:
        name, buf, at = task  # ``at``: byte offset of ``buf`` in the tensor, a multiple of the block size
        if self.crcs is not None:
            self.read_verified(name, buf, at // self.block, verify)
        else:  # plain safetensors: no checksum blocks
            self.read_range(buf, self.header.data_start + self.header.tensors[name].begin + at)

    def map_all(self, verify: bool) -> dict[str, Any]:
        return {name: self.map_one(name, self.kinds[name], verify) for name in self.header.tensors}

    def map_one(self, name: str, kind: str, verify: bool) -> Any:
        """Tensor ``name`` over a copy-on-write mapping of the file (one mapping per reader):
        nothing is copied, writes to it stay in this process; checked through the mapping."""
        if self._map is None:
            mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)
            if len(mm) != self.size:
                raise ChecksumError(f"{self.path}: file changed size while being opened")
            self._map = mm
        mm, t = self._map, self.header.tensors[name]
        start = self.header.data_start + t.begin
        if verify:
            with memoryview(mm) as mv:
                self.check(name, mv[start : start + t.nbytes])
        numel = t.nbytes // DTYPE_SIZES[t.dtype]
        if kind == "n":
            return np.frombuffer(mm, numpy_dtype(t.dtype), numel, start).reshape(t.shape)
        if numel == 0:
            return torch.empty(t.shape, dtype=torch_dtype(t.dtype))
        return torch.frombuffer(mm, dtype=torch_dtype(t.dtype), count=numel, offset=start).reshape(t.shape)

    def build(self, arrays: dict[str, Any], device: Any) -> Any:
        if device is not None:
            arrays = {n: (a.to(device) if isinstance(a, torch.Tensor) else a) for n, a in arrays.items()}
        if not self.header.is_tensorkeep:  # a plain safetensors file (a tensorkeep tree may be None itself)
            return arrays

        def get(name: str, kind: str) -> Any:
            if kind != self.kinds[name]:
                raise FormatError(f"{self.path}: stored structure refers to {name!r} as a torch tensor and as a NumPy array")
            return arrays[name]

        return unflatten(self.tree, get, self.path)


def load(path: "str | os.PathLike[str]", *, device: Any = None, lazy: bool = False, verify: bool = True) -> Any:
    """Load what :func:`save` wrote, with the same structure and types.

    Also reads plain safetensors files (a flat dict of tensors comes back) and
    ``.pt``/``.pth``/``.bin`` files through ``torch.load(weights_only=True)`` only.
    ``lazy=True`` maps the file instead of reading it; ``verify`` checks every checksum (for a
    ``.pt``, the CRC-32 its zip archive stores for each entry, which torch itself ignores).
    A mapped tensor is verified once, when mapped; its pages stay backed by the file, so another
    program editing the file in place later changes it, and truncating the file kills the process
    with SIGBUS when such a page is touched. Use the default ``lazy=False`` when that can happen.

    >>> import torch, tensorkeep as tk
    >>> tk.save([torch.arange(4), torch.zeros(4)], "/tmp/tk-doc-x-files")
    >>> x2, y2 = tk.load("/tmp/tk-doc-x-files")
    >>> x2
    tensor([0, 1, 2, 3])
    """
    path = os.fspath(path)
    if is_url(path):  # s3://…, memory://…: see tensorkeep.file.remote (local paths never get there)
        from tensorkeep.file.remote import load_url

        return load_url(path, device=device, lazy=lazy, verify=verify)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "distributed.json")):  # written by tk.save_distributed
            from tensorkeep.distributed.load import load_distributed

            return load_distributed(None, path, device=device)
        from tensorkeep.layouts.sharded import load_dir  # a sharded model directory

        return load_dir(path, device=device, lazy=lazy, verify=verify)
    r = _Reader(path)
    try:
        if r.torch_pickle:
            return _torch_file(path, device, lazy, verify=verify)
        arrays = r.map_all(verify) if lazy else r.read_all(verify)
        return r.build(arrays, device)
    finally:
        r.close()


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

    def __init__(self, path: "str | os.PathLike[str]") -> None:
        self.path = os.fspath(path)
        if is_url(self.path):  # s3://…: ranged reads, see tensorkeep.file.remote
            from tensorkeep.file.remote import open_reader

            self._r: _Reader = open_reader(self.path)
        else:
            self._r = _Reader(self.path)
        self._all: dict[str, Any] | None = None
        if self._r.torch_pickle:
            obj = _torch_file(self.path, None, False, self._r.torch_source())
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
        dt, shape = (src.dtype, tuple(src.shape)) if src is not None else (
            torch_dtype(self._r.header.tensors[name].dtype), self._r.header.tensors[name].shape)
        if dt != out.dtype or tuple(out.shape) != shape:
            raise ValueError(f"{self.path}: {name!r} is {dt} {list(shape)}, out is {out.dtype} {list(out.shape)}")
        if src is not None:
            return out.copy_(src)
        direct = out.device.type == "cpu" and out.is_contiguous() and not out.requires_grad
        if atomic or not direct or out.reshape(-1).stride(0) != 1:
            return out.copy_(self._r.read(name, "t", verify))
        self._r.read_verified(name, out.reshape(-1).view(torch.uint8).numpy(), 0, verify)
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

    def __enter__(self) -> "SafeOpen":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open(path: "str | os.PathLike[str]") -> SafeOpen:  # noqa: A001 - mirrors safetensors' safe_open
    """Open a file to read single tensors or slices without reading the rest.

    >>> import torch, tensorkeep as tk
    >>> tk.save({"w": torch.arange(10)}, "/tmp/tk-doc-open.tk")
    >>> with tk.open("/tmp/tk-doc-open.tk") as f:
    ...     f.keys(), f.get_slice("w")[2:5]
    (['w'], tensor([2, 3, 4]))
    """
    return SafeOpen(path)
