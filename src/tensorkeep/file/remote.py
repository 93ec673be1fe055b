"""``tk.save`` / ``tk.load`` / ``tk.open`` on object storage URLs (``s3://bucket/key``, ``memory://…``).

The file is the same safetensors file as on disk. Saving checksums the tensors first, then
streams header + data into one object write (a parallel multipart upload on S3; see
:mod:`tensorkeep.storage.objects`): the object appears whole or not at all. Reading fetches the
header with one ranged read; ``tk.open(url).get(name)`` and ``.get_slice(name)[a:b]`` fetch
only the byte ranges they need (whole checksum blocks, verified); ``tk.load`` fetches the
data area in parallel ranges. Objects cannot be memory-mapped: ``lazy=True`` reads them.
"""

from __future__ import annotations

import io
import os
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from tensorkeep.storage import objects as storage
from tensorkeep.errors import ChecksumError
from tensorkeep.file.reader import _Reader, _torch_file, load
from tensorkeep.core.format import crc_field, encode_header, stored_crc
from tensorkeep.file.writer import _block_crcs, final_header, plan, write

#: The first ranged read of an object fetches this much, which holds most headers whole.
HEAD_BYTES = 64 << 10


def write_url(obj: Any, url: str, user: dict[str, str], *, durable: bool = True) -> tuple[int, str]:
    """Write ``obj`` as one object at ``url``; returns its size and header checksum (8 hex digits).

    Tensors are read twice (checksums first, since the header leads the object, then the
    upload): a tensor on a GPU is copied to the host twice.
    """
    local = storage.local_path(url)
    if local is not None:
        write(obj, local, user, durable)
        return os.path.getsize(local), stored_crc(local)
    store, key = storage.locate(url)
    entries, info, meta, total = plan(obj, url, user)
    layout = [(n, dt, sh) for n, dt, sh, _ in entries]
    head, _ = encode_header(layout, meta, 8)
    info["crc"] = {n: _block_crcs(get(), info["block"]) for n, _, _, get in entries}
    final = final_header(layout, meta, info, 8, len(head))

    def chunks() -> Any:
        yield final
        for _, _, _, get in entries:
            yield get()

    store.write(key, chunks(), len(final) + total)
    return len(final) + total, crc_field(final)


class RemoteReader(_Reader):
    """A tensorkeep/safetensors object read by ranges: the same checks as a local file."""

    def __init__(self, url: str) -> None:
        self.path, self.fd = url, -1
        self.store, self.key = storage.locate(url)
        self.size = self.store.size(self.key)
        self._head = self.store.read_range(self.key, 0, min(self.size, HEAD_BYTES))
        self._open(self._pread)

    def _pread(self, n: int, at: int) -> bytes:
        if at + n <= len(self._head):
            return self._head[at : at + n]
        return self.store.read_range(self.key, at, at + n)

    def _get(self, at: int, n: int) -> bytes:
        data = self.store.read_range(self.key, at, at + n)
        if len(data) != n:
            raise ChecksumError(f"{self.path}: object is truncated (bytes {at}..{at + n} of {self.size} gave {len(data)})")
        return data

    def torch_source(self) -> Any:
        return io.BytesIO(self.store.read(self.key))

    def read_range(self, buf: Any, offset: int) -> None:
        """Fill ``buf`` from ``offset``: one ranged read, or PART_BYTES ranges in parallel."""
        mv = memoryview(buf).cast("B")
        span = storage.PART_BYTES
        if len(mv) <= span:
            mv[:] = self._get(offset, len(mv))
            return

        def fetch(at: int) -> None:
            n = min(span, len(mv) - at)
            mv[at : at + n] = self._get(offset + at, n)

        with ThreadPoolExecutor(storage.THREADS, thread_name_prefix="tk-get") as pool:
            list(pool.map(fetch, range(0, len(mv), span)))

    def read_verified(self, name: str, buf: np.ndarray, first_block: int, verify: bool) -> None:
        t = self.header.tensors[name]
        self.read_range(buf, self.header.data_start + t.begin + first_block * self.block)
        if verify:
            self.check(name, buf, first_block)

    def read_all(self, verify: bool) -> dict[str, Any]:
        """Every tensor: the data area in PART_BYTES ranges read in parallel (small tensors share
        a request), then every checksum."""
        out, bufs = {}, {}
        for name, t in self.header.tensors.items():
            out[name], buf = self._empty(t, self.kinds[name])
            bufs[name] = memoryview(buf).cast("B")
        order = sorted(self.header.tensors.values(), key=lambda t: t.begin)
        begins = [t.begin for t in order]
        total, span, start = order[-1].end if order else 0, storage.PART_BYTES, self.header.data_start

        def fetch(at: int) -> None:
            n = min(span, total - at)
            data = memoryview(self._get(start + at, n))
            i = max(0, bisect_right(begins, at) - 1)
            while i < len(order) and order[i].begin < at + n:
                t = order[i]
                lo, hi = max(t.begin, at), min(t.end, at + n)
                if hi > lo:
                    bufs[t.name][lo - t.begin : hi - t.begin] = data[lo - at : hi - at]
                i += 1

        with ThreadPoolExecutor(storage.THREADS, thread_name_prefix="tk-get") as pool:
            list(pool.map(fetch, range(0, total, span)))
            if verify and self.crcs is not None:
                list(pool.map(lambda name: self.check(name, bufs[name]), bufs))
        return out

    def map_all(self, verify: bool) -> dict[str, Any]:
        return self.read_all(verify)  # an object cannot be mapped: read it

    def map_one(self, name: str, kind: str, verify: bool) -> Any:
        return self.read(name, kind, verify)


def open_reader(url: str) -> _Reader:
    """A reader for ``url``: a local one for ``file://``, ranged reads otherwise."""
    local = storage.local_path(url)
    return _Reader(local) if local is not None else RemoteReader(url)


def load_url(url: str, *, device: Any = None, lazy: bool = False, verify: bool = True) -> Any:
    """:func:`tensorkeep.load` of a URL (``lazy`` is honoured for ``file://`` only)."""
    local = storage.local_path(url)
    if local is not None:
        return load(local, device=device, lazy=lazy, verify=verify)
    r = RemoteReader(url)
    if r.torch_pickle:
        return _torch_file(url, device, False, r.torch_source())
    return r.build(r.read_all(verify), device)
