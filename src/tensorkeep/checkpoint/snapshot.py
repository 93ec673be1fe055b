"""The blocking half of an asynchronous save: copy the state into reused host buffers.

Copying into memory that is already mapped runs at tens of GB/s; into fresh memory, page
faults make it ~50x slower. So the buffers of one checkpoint are kept for the next one
(matched by position, dtype and shape), and on CUDA they are pinned and filled with
non-blocking copies.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch


class Staging:
    """Reusable host copies of the tensors of a state, one set per manager."""

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}

    def _buffer(self, key: tuple, x: torch.Tensor) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None:
            pin = x.is_cuda and torch.cuda.is_available()
            buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=pin)
        return buf

    def snapshot(self, obj: Any) -> Any:
        """A deep copy of ``obj`` whose tensors live in this object's buffers (valid until the next call)."""
        used: dict[tuple, torch.Tensor] = {}
        memo: dict[tuple, torch.Tensor] = {}  # the same view twice (tied weights) -> one copy
        cuda = False

        def copy(x: Any, path: tuple) -> Any:
            nonlocal cuda
            if isinstance(x, torch.Tensor):
                view = (x.device, x.data_ptr(), x.dtype, tuple(x.shape), x.stride())
                if x.numel() and view in memo:
                    return memo[view]
                key = (path, x.dtype, tuple(x.shape))
                buf = self._buffer(key, x)
                cuda |= x.is_cuda
                with torch.no_grad():
                    buf.copy_(x.detach(), non_blocking=x.is_cuda)
                used[key] = memo[view] = buf
                if isinstance(x, torch.nn.Parameter):
                    return torch.nn.Parameter(buf, requires_grad=x.requires_grad)
                return buf
            if isinstance(x, np.ndarray):
                return x.copy()
            if type(x) in (dict, OrderedDict):
                out = type(x)((k, copy(v, path + (k,))) for k, v in x.items())
                if hasattr(x, "_metadata"):
                    out._metadata = copy(x._metadata, path + ("_metadata",))  # type: ignore[attr-defined]
                return out
            if type(x) in (list, tuple):
                return type(x)(copy(v, path + (i,)) for i, v in enumerate(x))
            return x  # immutable plain values; anything else is refused later by save

        out = copy(obj, ())
        if cuda:
            torch.cuda.synchronize()  # the non-blocking device-to-host copies must land before writing
        self._bufs = used
        return out
