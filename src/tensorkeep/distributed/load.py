"""Loading what :func:`tensorkeep.save_distributed` wrote: any world size, any layout, or one process.

Loading needs no collective: each rank reads, from the shard files, only the rows of the
chunks that overlap what it holds (``tk.open(...).get_slice``, checksummed as read), and
copies them into its tensors (for a DTensor, its local shard). The manifest is read and
validated by :func:`tensorkeep.distributed.manifest.read_manifest`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from tensorkeep import knobs
from tensorkeep.core.boxes import Box
from tensorkeep.core.dtypes import name_of_torch, torch_dtype
from tensorkeep.core.tree import unflatten
from tensorkeep.distributed.comm import dtensor_box, dtensor_type
from tensorkeep.distributed.manifest import Ref, read_manifest
from tensorkeep.distributed.plan import plan_read
from tensorkeep.errors import FormatError, MismatchError
from tensorkeep.file import stored
from tensorkeep.file.safeopen import SafeOpen
from tensorkeep.storage.disk import DiskBackend


def _index(offsets: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(offsets, sizes))


class Checkpoint:
    """A distributed checkpoint opened for reading boxes of its tensors."""

    def __init__(self, path: str, device: Any = None) -> None:
        self.path, self.device = path, device
        self.manifest, self.tensors = read_manifest(path)
        self.file_of = {info["rank"]: name for name, info in self.manifest["files"].items()}
        self._open: dict[int, SafeOpen] = {}
        self._checked: set[tuple[int, str]] = set()

    def _file(self, rank: int, key: str) -> SafeOpen:
        name = self.file_of[rank]
        if rank not in self._open:
            stored.check(DiskBackend(self.path), name, self.manifest["files"][name], self.path)
            self._open[rank] = SafeOpen(os.path.join(self.path, name))
        f = self._open[rank]
        if (rank, key) not in self._checked:
            chunk = next(c for c in self.tensors[key].chunks if c.rank == rank)
            info = f.info(key) if key in f else None
            if info is None or info.dtype != self.tensors[key].dtype or tuple(info.shape) != chunk.sizes:
                found = "nothing" if info is None else f"{info.dtype} {list(info.shape)}"
                raise FormatError(
                    f"{self.path}: {name} should hold {key!r} as {self.tensors[key].dtype} "
                    f"{list(chunk.sizes)}, it holds {found}"
                )
            self._checked.add((rank, key))
        return f

    def read_box(self, key: str, box: Box, out: torch.Tensor) -> None:
        """Fill ``out`` (shaped like ``box``) with that box of tensor ``key``, reading only the rows needed."""
        with torch.no_grad():
            for item in plan_read(self.tensors[key].chunks, box):
                f = self._file(item.rank, key)
                if not item.sizes:  # a 0-d tensor
                    piece = f.get(key)
                else:
                    rows = f.get_slice(key)[item.src[0] : item.src[0] + item.sizes[0]]
                    piece = rows[(slice(None), *_index(item.src[1:], item.sizes[1:]))]
                if isinstance(piece, np.ndarray):
                    piece = torch.from_numpy(np.ascontiguousarray(piece).reshape(piece.shape))  # 0-d stays 0-d
                out[_index(item.dst, item.sizes)].copy_(piece)

    def full(self, key: str, kind: str) -> Any:
        """Tensor ``key`` whole, as a plain tensor (``kind`` 'n': a NumPy array)."""
        t = self.tensors[key]
        out = torch.empty(t.shape, dtype=torch_dtype(t.dtype))
        self.read_box(key, ((0,) * len(t.shape), t.shape), out)
        if kind == "n":
            return out.numpy()
        return out if self.device is None else out.to(self.device)

    def box_of(self, key: str, target: Any, where: str) -> tuple[Box, torch.Tensor]:
        """(the box of tensor ``key`` that ``target`` holds, the tensor to fill): a tensor, a DTensor's
        local shard, a NumPy array's tensor view. Raises :class:`MismatchError` if they do not fit."""
        t, dt = self.tensors[key], dtensor_type()
        if dt is not None and isinstance(target, dt):
            box, local = dtensor_box(target, where)
        else:
            local = torch.from_numpy(target) if isinstance(target, np.ndarray) else target
            box = ((0,) * target.ndim, tuple(target.shape))
        if name_of_torch(local.dtype) != t.dtype or tuple(target.shape) != t.shape:
            raise MismatchError(
                f"cannot load {self.path} into {where}: the state has {name_of_torch(local.dtype)} "
                f"{list(target.shape)}, the checkpoint's {key!r} is {t.dtype} {list(t.shape)}. Fix: build the state "
                "with the same model and optimizer settings as when saving (only the sharding may differ)"
            )
        return box, local

    def materialize(self, v: Any) -> Any:
        """``v`` from the saved structure with every :class:`Ref` read whole."""
        if isinstance(v, Ref):
            x = self.full(v.name, v.kind)
            return x[()] if v.scalar else x
        if isinstance(v, dict):
            for k in v:
                v[k] = self.materialize(v[k])
            return v
        if type(v) in (list, tuple):
            return type(v)(self.materialize(x) for x in v)
        return v

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


def _without_flags(n: Any, depth: int = 0) -> Any:
    """The tree with tensors' Parameter / requires_grad flags dropped (tensors come as :class:`Ref`)."""
    if depth > knobs.MAX_DEPTH:
        raise FormatError(f"stored structure nested more than {knobs.MAX_DEPTH} levels deep")
    if type(n) is list:
        return [_without_flags(x, depth + 1) for x in n]
    if type(n) is dict:
        if "t" in n:
            return {"t": n["t"]}
        return {k: _without_flags(v, depth + 1) for k, v in n.items()}
    return n


def _is_array(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, np.ndarray))


def _has_array(x: Any) -> bool:
    if isinstance(x, dict):
        return any(_has_array(v) for v in x.values())
    if type(x) in (list, tuple):
        return any(_has_array(v) for v in x)
    return _is_array(x)


def _plan(target: Any, saved: Any, where: str, ck: Checkpoint, fills: list, sets: list) -> Any:
    """The value for ``target``'s slot, changing nothing yet: each tensor to fill in place goes to
    ``fills`` as (key, box, tensor), each dict entry or list content to set to ``sets`` as
    (container, key, value); only values ``target`` lacks are read (whole) now."""
    if _is_array(target):
        if not isinstance(saved, Ref):
            raise MismatchError(
                f"cannot load {ck.path} into {where}: the state has a tensor there, the "
                f"checkpoint a {type(saved).__name__}"
            )
        fills.append((saved.name, *ck.box_of(saved.name, target, where)))
        return target
    if isinstance(target, dict) and isinstance(saved, dict):
        missing = [k for k in target if k not in saved]
        if missing:
            raise MismatchError(
                f"cannot load {ck.path} into {where}: the checkpoint has no {missing[0]!r} there "
                f"({len(missing)} keys missing; it has {list(saved)[:8]}). Fix: remove the key from "
                "the state, or load from a checkpoint that has it"
            )
        for k, v in saved.items():
            sets.append(
                (
                    target,
                    k,
                    _plan(target[k], v, f"{where}[{k!r}]", ck, fills, sets) if k in target else ck.materialize(v),
                )
            )
        return target
    if type(target) in (list, tuple) and type(saved) is type(target) and len(saved) == len(target):
        items = [_plan(t, s, f"{where}[{i}]", ck, fills, sets) for i, (t, s) in enumerate(zip(target, saved))]
        if type(target) is tuple:
            return tuple(items)
        sets.append((target, slice(None), items))
        return target
    if _has_array(target):
        raise MismatchError(
            f"cannot load {ck.path} into {where}: the state holds tensors there, the checkpoint "
            f"a {type(saved).__name__} (of another length or type)"
        )
    return ck.materialize(saved)


def load_distributed(state: Any, path: str | os.PathLike[str], *, device: Any = None, atomic: bool = True) -> Any:
    """Load a :func:`tensorkeep.save_distributed` checkpoint into ``state``, in place; returns it.

    ``state`` says what each rank wants, as for torch DCP: its tensors and DTensors have the
    target shapes and placements (any world size and sharding, not necessarily the saved ones)
    and are filled in place, each rank reading only the bytes it needs; values that are not
    tensors are replaced by the saved ones; keys the checkpoint has and ``state``'s dicts lack
    are added (as whole plain tensors). Works with or without a process group (no collective).
    ``state=None`` returns everything with plain, whole tensors (``device``: where to put them),
    as ``tk.load(path)`` does. Raises :class:`MismatchError` when a shape or dtype differs.

    All or nothing: after any error (a mismatch, a damaged or missing file) ``state`` is unchanged.
    Every box this rank needs is read and verified into CPU memory before the first tensor of
    ``state`` is written (peak: one more copy of this rank's part, in host memory, never on the
    device); ``atomic=False`` reads straight into ``state`` instead (no extra memory; after an
    error, tensors filled before it hold the checkpoint's values).

    >>> import torch, tensorkeep as tk
    >>> tk.save_distributed({"w": torch.arange(6.0), "step": 3}, "/tmp/tk-doc-dist-load")
    >>> state = {"w": torch.zeros(6), "step": 0}
    >>> tk.load_distributed(state, "/tmp/tk-doc-dist-load")["step"], state["w"][:3]
    (3, tensor([0., 1., 2.]))
    """
    path = os.fspath(path)
    ck = Checkpoint(path, device)
    try:
        if state is None:
            return unflatten(ck.manifest["tree"], ck.full, path)
        saved = unflatten(_without_flags(ck.manifest["tree"]), lambda name, kind: Ref(name, kind), path)
        fills: list[tuple[str, Box, torch.Tensor]] = []
        sets: list[tuple[Any, Any, Any]] = []
        out = _plan(state, saved, "state", ck, fills, sets)  # every mismatch raises here, before any change
        if not atomic:
            for key, box, local in fills:
                ck.read_box(key, box, local)
        else:
            read = []
            for key, box, local in fills:
                read.append((local, torch.empty(local.shape, dtype=local.dtype)))
                ck.read_box(key, box, read[-1][1])
            with torch.no_grad():
                for local, tmp in read:
                    local.copy_(tmp)
        for container, k, v in sets:
            container[k] = v
        return out
    finally:
        ck.close()
