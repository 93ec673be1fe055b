"""Sharded save with torch.distributed: every rank writes its own shard file, in parallel.

    path/                          published by one atomic rename once every rank succeeded
      rank-00000-of-00004.tk       a tensorkeep file: the chunks rank 0 writes, named by key
      rank-00001-of-00004.tk       ...
      distributed.json             the manifest (layout of every tensor, the structure), written last

Plain tensors and ``Replicate()`` DTensors count as replicated (identical on every rank) and
are written once, by one rank, spread to balance bytes. ``Shard(d)`` DTensors (a ``DeviceMesh``,
FSDP2 ``fully_shard`` parameters) are written as their local shards. Everything that is not a
tensor (step counters, hyper-parameters) is taken from rank 0. ``path`` must be on a file system
every rank sees. Loading (any world size, any layout, or one process): :mod:`tensorkeep.distributed.load`.

The protocol, each step ending with an all-gather of every rank's outcome so that a failure
anywhere raises :class:`SaveError` everywhere and nothing is published:
rank 0 makes the temporary directory -> every rank writes and fsyncs its file -> rank 0 writes
the manifest -> rank 0 fsyncs and renames the directory over ``path``. A rank that dies breaks
the collective: the others raise and rank 0 removes the temporary directory (or, if rank 0 died,
its next save does). Messages between ranks are JSON, never pickle. The plan (who writes what):
:mod:`tensorkeep.distributed.plan`; the manifest: :mod:`tensorkeep.distributed.manifest`; the
collectives: :mod:`tensorkeep.distributed.comm`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import torch

from tensorkeep import knobs
from tensorkeep.core.dtypes import name_of_numpy, name_of_torch
from tensorkeep.core.tree import flatten
from tensorkeep.distributed.comm import Comm, dtensor_box, dtensor_type
from tensorkeep.distributed.manifest import (
    MANIFEST,
    build_manifest,
    is_shard_file,
    own_files,
    sealed_json,
    shard_file,
)
from tensorkeep.distributed.plan import Held, plan_save
from tensorkeep.errors import SaveError
from tensorkeep.file.writer import write
from tensorkeep.storage import local as _io

_NOTHING = "Nothing was committed: the previous checkpoint at that path, if any, is intact."


def _swap_dtensors(x: Any, dt: Any, found: dict[int, tuple[Any, torch.Tensor]], depth: int) -> Any:
    """A copy of the containers of ``x`` with each DTensor (of class ``dt``, None if none can exist) replaced
    by its local tensor (noted in ``found``)."""
    if dt is None or depth > knobs.MAX_DEPTH:
        return x  # flatten refuses what is too deep, with its own message
    if isinstance(x, dt):
        with torch.no_grad():
            local = x.to_local()
        found[id(local)] = (x, local)
        return local
    t = type(x)
    if t is dict or t is OrderedDict:
        out = t((k, _swap_dtensors(v, dt, found, depth + 1)) for k, v in x.items())
        if hasattr(x, "_metadata"):
            out._metadata = x._metadata  # type: ignore[attr-defined]
        return out
    if t is list or t is tuple:
        return t(_swap_dtensors(v, dt, found, depth + 1) for v in x)
    return x


def local_view(state: Any) -> tuple[Any, dict[str, Any], list[Held]]:
    """(the structure as a tensorkeep tree, key -> what this rank would write, what it holds)."""
    found: dict[int, tuple[Any, torch.Tensor]] = {}
    tree, leaves = flatten(_swap_dtensors(state, dtensor_type(), found, 0))
    arrays, held = {}, []
    for key, x in leaves:
        if id(x) in found:
            (offsets, sizes), local = dtensor_box(found[id(x)][0], f"DTensor {key!r}")
            dtype, shape = name_of_torch(x.dtype), tuple(found[id(x)][0].shape)
        else:
            dtype = name_of_torch(x.dtype) if isinstance(x, torch.Tensor) else name_of_numpy(x.dtype)
            shape = tuple(x.shape)
            offsets, sizes, local = (0,) * len(shape), shape, x
        if dtype is None:
            raise TypeError(f"cannot save tensor {key!r}: dtype {x.dtype} is not one safetensors can store")
        arrays[key] = local
        held.append(Held(key, dtype, shape, offsets, sizes))
    return tree, arrays, held


def write_distributed(
    state: Any,
    directory: str,
    *,
    group: Any = None,
    label: str | None = None,
    outcome: str = _NOTHING,
    durable: bool = True,
) -> list[str]:
    """Collective: write this rank's shard of ``state`` into ``directory`` (existing, the same path
    on every rank), fsynced; once every rank succeeded, rank 0 writes the manifest (fsynced). Does
    not publish: the caller fsyncs ``directory`` and renames it. Returns the names written
    (``durable=False``: no fsyncs, for scratch runs).
    On a failure anywhere every rank raises :class:`SaveError` (its message starts with ``label``
    and ends with ``outcome``); the caller removes ``directory``.
    """
    comm = Comm(group)
    where = label or f"save_distributed into {directory}"
    error: Exception | None = None
    tree: Any = None
    arrays: dict[str, Any] = {}
    held: list[Held] = []
    try:
        tree, arrays, held = local_view(state)
    except Exception as e:
        error = e
    statuses = comm.check(error, f"{where}: inspecting the state", outcome, {"held": [h.to_json() for h in held]})
    try:
        plan = plan_save([[Held.from_json(v) for v in s["held"]] for s in statuses])  # the same on every rank
    except SaveError as e:
        raise SaveError(f"{where}: {e}. {outcome}") from None
    name = shard_file(comm.rank, comm.world)
    error, info = None, {}
    try:
        if not os.path.isdir(directory):
            raise SaveError(
                f"rank {comm.rank} does not see the directory {directory}: every rank must save to "
                "the same path on a shared file system"
            )
        p = os.path.join(directory, name)
        size, crc = write({k: arrays[k] for k in plan.keys_for(comm.rank)}, p, {"format": "pt"}, durable, in_place=True)
        info = {"size": size, "crc32": crc}
    except Exception as e:
        error = e
    files = comm.check(error, f"{where}: writing the shard files", outcome, info)
    error = None
    if comm.rank == 0:
        try:
            with _io.atomic_file(os.path.join(directory, MANIFEST), durable=durable, in_place=True) as fd:
                _io.pwrite_all(fd, memoryview(sealed_json(build_manifest(plan, tree, files))), 0)
        except Exception as e:
            error = e
    comm.check(error, f"{where}: writing the manifest", outcome)
    return [shard_file(r, comm.world) for r in range(comm.world)] + [MANIFEST]


def make_temp_dir(path: str) -> str:
    """A new temporary directory next to ``path`` (after cleaning up those of crashed saves)."""
    _io.makedirs(os.path.dirname(path))
    _io.remove_stale_temps(path, lambda d: {f for f in os.listdir(d) if f == MANIFEST or is_shard_file(f)}, MANIFEST)
    own_files(path)  # refuse early what would not be replaced
    tmp = _io.tmp_path(path)
    _io.mkdir(tmp)
    return tmp


def save_distributed(state: Any, path: str | os.PathLike[str], *, group: Any = None) -> None:
    """Save ``state`` from every rank of the process group (a collective: call it on every rank).

    Each rank writes its own file in parallel: the local shards of its DTensors, and its share
    of the replicated tensors (each written once). ``path`` is published atomically once every
    rank's file is on disk; a failure on any rank raises :class:`SaveError` on every rank and
    leaves the previous checkpoint at ``path`` as it was. Plain tensors must be identical on
    every rank (one rank writes each); values that are not tensors are rank 0's. Without a
    process group, it saves from this one process. Read it back with
    :func:`tensorkeep.load_distributed` (any world size) or ``tk.load(path)`` (plain tensors).

    >>> import torch, tensorkeep as tk                      # on every rank, after init_process_group
    >>> tk.save_distributed({"model": {"w": torch.ones(2)}, "step": 7}, "/tmp/tk-doc-dist")
    >>> tk.load("/tmp/tk-doc-dist")
    {'model': {'w': tensor([1., 1.])}, 'step': 7}
    """
    path = os.path.abspath(os.fspath(path))
    comm = Comm(group)
    tmp, error = "", None
    if comm.rank == 0:
        try:
            tmp = make_temp_dir(path)
        except Exception as e:
            error = e
    try:
        tmp = comm.check(error, f"save_distributed to {path}: creating a temporary directory", _NOTHING, {"tmp": tmp})[
            0
        ]["tmp"]
        write_distributed(state, tmp, group=group, label=f"save_distributed to {path}")

        def publish() -> None:
            _io.fsync_dir(tmp)
            _io.replace_dir(tmp, path, names=own_files(path))

        comm.on_rank0(
            publish,
            f"save_distributed to {path}: publishing",
            "Rank 0 could not rename the finished directory into place: the checkpoint at "
            "that path is the previous one or the new one, whole.",
        )
    except BaseException:
        comm.drop_temp(tmp)
        raise
