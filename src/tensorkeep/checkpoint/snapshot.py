"""The blocking half of an asynchronous save: copy the state into reused host buffers.

Copying into memory that is already mapped runs at tens of GB/s; into fresh memory, page
faults make it ~50x slower. So the buffers of one checkpoint are kept for the next one
(matched by position, dtype and shape). On CUDA they are pinned and filled by non-blocking
copies on a side stream: ``snapshot`` returns once the copies are queued, the GPU's later
work is ordered after them, and the writer waits for them with :meth:`Staging.ready`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from tensorkeep import knobs
from tensorkeep.file.writer import FileImage, image


class Staging:
    """Reusable host copies of the tensors of a state, one set per manager."""

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}
        self._pending: list[torch.cuda.Event] = []
        self._later: list[tuple[torch.Tensor, torch.Tensor, int, tuple]] = []  # (buffer, source, version, path)

    def _buffer(self, key: tuple, x: torch.Tensor) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None:
            pin = x.is_cuda and torch.cuda.is_available()
            buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=pin)
        return buf

    def snapshot(self, obj: Any, defer: frozenset[int] = frozenset()) -> Any:
        """A deep copy of ``obj`` whose tensors live in this object's buffers (valid until the next call).

        CPU tensors whose ``data_ptr()`` is in ``defer`` get their buffer but are copied later, by
        :meth:`copy_deferred` (the lazy snapshot of ``async_save="lazy"``)."""
        self._later = []  # a snapshot that failed halfway must not leave copies to do
        used: dict[tuple, torch.Tensor] = {}
        memo: dict[tuple, torch.Tensor] = {}  # the same view twice (tied weights) -> one copy
        streams: dict[torch.device, torch.cuda.Stream] = {}

        def side_stream(dev: torch.device) -> torch.cuda.Stream:
            # device-to-host copies go on a side stream, after the work already queued (which
            # computes the values to save)
            if dev not in streams:
                streams[dev] = torch.cuda.Stream(dev)
                streams[dev].wait_stream(torch.cuda.current_stream(dev))
            return streams[dev]

        def copy(x: Any, path: tuple) -> Any:
            if isinstance(x, torch.Tensor):
                view = (x.device, x.data_ptr(), x.dtype, tuple(x.shape), x.stride(), x.is_conj(), x.is_neg())
                if x.numel() and view in memo:
                    return memo[view]
                key = (path, x.dtype, tuple(x.shape))
                buf = self._buffer(key, x)
                if x.device.type == "cpu" and x.numel() and x.data_ptr() in defer:
                    self._later.append((buf, x, x._version, path))
                    used[key] = memo[view] = buf
                    return (
                        torch.nn.Parameter(buf, requires_grad=x.requires_grad)
                        if isinstance(x, torch.nn.Parameter)
                        else buf
                    )
                with torch.no_grad():
                    if x.is_cuda:
                        with torch.cuda.stream(side_stream(x.device)):
                            buf.copy_(x.detach(), non_blocking=True)
                    else:
                        buf.copy_(x.detach())
                used[key] = memo[view] = buf
                if isinstance(x, torch.nn.Parameter):
                    return torch.nn.Parameter(buf, requires_grad=x.requires_grad)
                return buf
            if isinstance(x, np.ndarray):
                return x.copy()
            if len(path) > knobs.MAX_DEPTH + 2:  # (file, key, ...): the same limit as the writer's
                raise ValueError(
                    f"cannot save {path[2]!r}: nested more than {knobs.MAX_DEPTH} levels deep "
                    "(is there a cycle, a container that holds itself?)"
                )
            if type(x) in (dict, OrderedDict):
                out = type(x)((k, copy(v, path + (k,))) for k, v in x.items())
                if hasattr(x, "_metadata"):
                    out._metadata = copy(x._metadata, path + ("_metadata",))
                return out
            if type(x) in (list, tuple):
                return type(x)(copy(v, path + (i,)) for i, v in enumerate(x))
            return x  # immutable plain values; anything else is refused later by save

        out = copy(obj, ())
        for dev, st in streams.items():
            ev = torch.cuda.Event()
            ev.record(st)
            self._pending.append(ev)
            # GPU work queued from now on (an optimizer step updating these tensors, or memory of
            # freed ones reused) runs after the copies; the CPU does not wait for them here
            torch.cuda.current_stream(dev).wait_stream(st)
        self._bufs = used
        return out

    def copy_deferred(self) -> list[tuple]:
        """Copy the tensors the last :meth:`snapshot` deferred. Returns the paths of those whose
        version counter moved (changed in place: the copy may mix old and new values).

        Writes that bypass autograd's version counter cannot be seen: ``p.data.mul_(0)`` (``.data``
        is a new tensor with its own counter over the same storage), a NumPy view, ``untyped_storage()``.
        Storage has no counter, and any exact check would read every byte inside ``save()``, which is
        what ``async_save=True`` does anyway (its copy: ~100 ms per 500 MB on one core). So with
        ``async_save="lazy"`` such writes are unsupported until ``wait()``: the manager's docs say so."""
        changed = []
        with torch.no_grad():
            for buf, x, version, path in self._later:
                buf.copy_(x)
                if x._version != version:
                    changed.append(path)
        self._later = []
        return changed

    def ready(self) -> None:
        """Block until the device-to-host copies of the last snapshot have landed (the writer
        calls this before reading the buffers; a no-op for CPU tensors)."""
        for ev in self._pending:
            ev.synchronize()
        self._pending = []


def small_image(obj: Any, name: str) -> FileImage | Any:
    """``obj`` as the finished bytes of its file when its tensors total less than
    ``knobs.ONE_WRITE_BYTES`` (copied now, like a snapshot), else ``obj`` itself."""
    if _tensor_bytes(obj, knobs.ONE_WRITE_BYTES, 0) >= knobs.ONE_WRITE_BYTES:
        return obj  # checked first: a big state is not walked twice
    img = image(obj, name, {})
    return obj if img is None else img


def _tensor_bytes(obj: Any, limit: int, depth: int) -> int:
    """Bytes of the tensors and arrays in ``obj``, counted until ``limit`` is passed (too deep
    a nesting counts as ``limit``: the writer then reports it)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if depth > knobs.MAX_DEPTH:
        return limit
    n = 0
    if isinstance(obj, (dict, list, tuple)):
        for v in obj.values() if isinstance(obj, dict) else obj:
            n += _tensor_bytes(v, limit - n, depth + 1)
            if n >= limit:
                break
    return n
