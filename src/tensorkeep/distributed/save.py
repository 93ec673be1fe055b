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
its next save does). Messages between ranks are JSON, never pickle.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from collections import OrderedDict
from typing import Any, Callable

import torch

from tensorkeep import knobs

from tensorkeep.storage import local as _io
from tensorkeep.distributed.plan import Box, Held, SavePlan, plan_save, shard_box
from tensorkeep.core.dtypes import name_of_numpy, name_of_torch
from tensorkeep.errors import SaveError
from tensorkeep.core.format import seal, stored_crc, strict_json
from tensorkeep.core.tree import flatten
from tensorkeep.file.writer import write

MANIFEST = "distributed.json"
FORMAT = "tensorkeep-distributed"
VERSION = 1
_NOTHING = "Nothing was committed: the previous checkpoint at that path, if any, is intact."


def shard_file(rank: int, world: int) -> str:
    """The file a rank writes: ``rank-00002-of-00004.tk``."""
    return f"rank-{rank:05d}-of-{world:05d}.tk"


def sealed_json(value: Any) -> bytes:
    """:func:`json_bytes` with its CRC-32 in front (``format.seal``), so a flipped bit is caught."""
    try:
        return seal(json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False))
    except UnicodeEncodeError:
        return seal(json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False))


def json_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON (strings with lone surrogates, which UTF-8 cannot hold, as escapes)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode()



def dtensor_type() -> type | None:
    """``DTensor``, if anything imported it (otherwise no DTensor can exist: no import cost)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def dtensor_box(x: Any, where: str) -> tuple[Box, torch.Tensor]:
    """(the box of the global tensor this rank holds, the local tensor) of a DTensor."""
    from torch.distributed.tensor import Replicate, Shard

    dims: list[int | None] = []
    for p in x.placements:
        if type(p) is Shard:
            dims.append(p.dim)
        elif type(p) is Replicate:
            dims.append(None)
        else:
            raise TypeError(
                f"{where}: DTensor placement {p} is not supported (only Shard(dim) and Replicate()). "
                "Fix: redistribute it first, e.g. x.redistribute(x.device_mesh, [Replicate()] * x.device_mesh.ndim)")
    mesh = x.device_mesh
    box = shard_box(tuple(x.shape), tuple(mesh.shape), mesh.get_coordinate(), dims)
    with torch.no_grad():
        local = x.to_local()
    if tuple(local.shape) != box[1]:
        raise TypeError(f"{where}: the local shard is {list(local.shape)}, but placements {list(x.placements)} of "
                        f"global shape {list(x.shape)} give {list(box[1])}: uneven custom shardings are not supported")
    return box, local


class Comm:
    """The collectives a save needs, on JSON values. Without an initialized process group,
    a group of one: ``save_distributed`` then works in a single process too."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
            gloo = "gloo" in str(dist.get_backend(group)).lower()
            cuda = not gloo and torch.cuda.is_available()
            self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        elif group is not None:
            raise ValueError("a process group was given, but torch.distributed is not initialized")
        else:
            self.rank, self.world, self.device = 0, 1, torch.device("cpu")

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (JSON through two ``all_gather`` calls)."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        data = torch.frombuffer(bytearray(json_bytes(value)), dtype=torch.uint8)
        n = torch.tensor([data.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.empty_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n, group=self.group)
        lengths = [int(s.item()) for s in sizes]
        buf = torch.zeros(max(lengths), dtype=torch.uint8, device=self.device)
        buf[: data.numel()] = data.to(self.device)
        outs = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(outs, buf, group=self.group)
        return [strict_json(bytes(o[:k].cpu().numpy()), f"rank {r}'s status") for r, (o, k) in enumerate(zip(outs, lengths))]

    def check(self, error: BaseException | None, what: str, outcome: str, extra: dict | None = None) -> list[dict]:
        """All-gather every rank's outcome of a step (and ``extra``); raise :class:`SaveError` on
        every rank, naming the failing rank and its error, if any rank failed."""
        mine = {"error": None if error is None else f"{type(error).__name__}: {error}", **(extra or {})}
        try:
            statuses = self.all_gather(mine)
        except Exception as e:  # noqa: BLE001 - gloo/NCCL raise RuntimeError subclasses
            raise SaveError(f"{what}: rank {self.rank} of {self.world} lost contact with the other ranks ({e}). "
                            f"Another rank probably died or timed out. {outcome}") from (error or e)
        failed = [(r, s["error"]) for r, s in enumerate(statuses) if s["error"]]
        if failed:
            r, msg = failed[0]
            more = f" (and on ranks {[f[0] for f in failed[1:]]})" if len(failed) > 1 else ""
            raise SaveError(f"{what} failed on rank {r} of {self.world}{more}: {msg}. {outcome}") from error
        return statuses

    def on_rank0(self, fn: Callable[[], Any], what: str, outcome: str) -> None:
        """Run ``fn`` on rank 0 only (publishing, say); its error is raised on every rank."""
        error = None
        if self.rank == 0:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - reported to every rank
                error = e
        self.check(error, what, outcome)

    def drop_temp(self, tmp: str) -> None:
        """After a failed save: rank 0 removes the temporary directory, if it made one."""
        if self.rank == 0 and tmp and os.path.isdir(tmp):
            try:
                _io.rmtree(tmp)
            except OSError:
                pass


def _swap_dtensors(x: Any, dt: type | None, found: dict[int, tuple[Any, torch.Tensor]], depth: int) -> Any:
    """A copy of the containers of ``x`` with each DTensor replaced by its local tensor (noted in ``found``)."""
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


def manifest(plan: SavePlan, tree: Any, files: list[dict]) -> dict[str, Any]:
    """The manifest: every file (size, header checksum), every tensor's layout, the structure.

    ``{"format": "tensorkeep-distributed", "version": 1, "world_size": 4,
    "files": {"rank-00000-of-00004.tk": {"rank": 0, "size": 5532, "crc32": "14498639"}, ...},
    "tensors": {"rows": {"dtype": "F32", "shape": [10, 6], "chunks": [{"file": "rank-00000-of-00004.tk",
    "offsets": [0, 0], "sizes": [3, 6]}, ...]}, ...}, "tree": <tensorkeep tree, tensors as {"t": key}>,
    "versions": {...}}``. A chunk is stored in its file under the tensor's key, with shape ``sizes``.
    """
    from tensorkeep._version import __version__

    w = plan.world_size
    return {
        "format": FORMAT, "version": VERSION, "world_size": w,
        "files": {shard_file(r, w): {"rank": r, "size": f["size"], "crc32": f["crc32"]} for r, f in enumerate(files)},
        "tensors": {k: {"dtype": plan.dtypes[k], "shape": list(plan.shapes[k]),
                        "chunks": [{"file": shard_file(c.rank, w), "offsets": list(c.offsets), "sizes": list(c.sizes)}
                                   for c in cs]}
                    for k, cs in plan.chunks.items()},
        "tree": tree,
        "versions": {"tensorkeep": __version__, "torch": torch.__version__.split("+")[0]},
    }


def write_distributed(state: Any, directory: str, *, group: Any = None, label: str | None = None,
                      outcome: str = _NOTHING, durable: bool = True) -> list[str]:
    """Collective: write this rank's shard of ``state`` into ``directory`` (existing, the same path
    on every rank), fsynced; once every rank succeeded, rank 0 writes the manifest (fsynced). Does
    not publish: the caller fsyncs ``directory`` and renames it. Returns the names written
    (``durable=False``: no fsyncs, for scratch runs).
    On a failure anywhere every rank raises :class:`SaveError` (its message starts with ``label``
    and ends with ``outcome``); the caller removes ``directory``.
    """
    comm = Comm(group)
    where = label or f"save_distributed into {directory}"
    error, tree, arrays, held = None, None, {}, []
    try:
        tree, arrays, held = local_view(state)
    except Exception as e:  # noqa: BLE001 - reported to every rank below
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
            raise SaveError(f"rank {comm.rank} does not see the directory {directory}: every rank must save to "
                            "the same path on a shared file system")
        p = os.path.join(directory, name)
        write({k: arrays[k] for k in plan.keys_for(comm.rank)}, p, {"format": "pt"}, durable, in_place=True)
        info = {"size": os.path.getsize(p), "crc32": stored_crc(p)}
    except Exception as e:  # noqa: BLE001
        error = e
    files = comm.check(error, f"{where}: writing the shard files", outcome, info)
    error = None
    if comm.rank == 0:
        try:
            with _io.atomic_file(os.path.join(directory, MANIFEST), durable=durable, in_place=True) as fd:
                _io.pwrite_all(fd, memoryview(sealed_json(manifest(plan, tree, files))), 0)
        except Exception as e:  # noqa: BLE001
            error = e
    comm.check(error, f"{where}: writing the manifest", outcome)
    return [shard_file(r, comm.world) for r in range(comm.world)] + [MANIFEST]


def remove_stale_temps(path: str) -> None:
    """Remove temporary directories of saves of ``path`` whose process died (on this host): only
    tensorkeep's temporary names, only the files it writes into them. A checkpoint that a save
    had moved aside to replace it (``_io.replace_dir`` without RENAME_EXCHANGE) is put back when
    ``path`` is missing."""
    parent, base = os.path.split(path)
    for n in sorted(os.listdir(parent), key=lambda n: _io.REPLACED not in n):  # parked ones first
        t = _io.temp_of(n)
        p = os.path.join(parent, n)
        if t is None or t[0] not in (base, base + _io.REPLACED) or not _io.is_stale_temp(n) or not _io.is_real_dir(p):
            continue
        if t[0] != base and not os.path.lexists(path) and _io.is_regular_file(os.path.join(p, MANIFEST)):
            _io.rename(p, path)
            _io.fsync_dir(parent)
            continue
        _io.remove_own_dir(p, {f for f in os.listdir(p) if f == MANIFEST or _SHARD_RE.match(f)})


_SHARD_RE = re.compile(r"^rank-\d{5,}-of-\d{5,}\.tk$")


def own_files(path: str) -> set[str]:
    """The entries of an existing checkpoint directory ``path`` that a new save may delete: the files
    its ``distributed.json`` lists and itself; :class:`SaveError` if it holds anything else (or is not
    one), so that nothing tensorkeep did not write is ever deleted."""
    if not os.path.lexists(path):
        return set()
    if not _io.is_real_dir(path):
        raise SaveError(errno.EEXIST, f"{path} exists and is not a directory (a symlink?), so it is not replaced. "
                        "Fix: save to a new path, or remove it first")
    names = set(os.listdir(path))
    if not names:
        return set()
    if not _io.is_regular_file(os.path.join(path, MANIFEST)):
        raise SaveError(errno.EEXIST, f"{path} exists and is not a checkpoint written by save_distributed, so it is "
                        "not replaced. Fix: save to a new path, or remove it first")
    try:
        with open(os.path.join(path, MANIFEST), "rb") as f:
            listed = strict_json(f.read(knobs.MAX_HEADER_BYTES + 1), os.path.join(path, MANIFEST)).get("files")
        ours = {n for n in listed if type(n) is str} | {MANIFEST}
    except Exception:  # noqa: BLE001 - damaged: only the names save_distributed gives its files are its own
        ours = {n for n in names if _SHARD_RE.match(n)} | {MANIFEST}
    foreign = sorted(n for n in names if n not in ours or not _io.is_regular_file(os.path.join(path, n)))
    if foreign:
        shown = ", ".join(repr(n) for n in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise SaveError(errno.EEXIST, f"{path} holds entries save_distributed did not write ({shown}), so it is not "
                        "replaced. Fix: move them out of it, or save to a new path")
    return names


def make_temp_dir(path: str) -> str:
    """A new temporary directory next to ``path`` (after cleaning up those of crashed saves)."""
    _io.makedirs(os.path.dirname(path))
    remove_stale_temps(path)
    own_files(path)  # refuse early what would not be replaced
    tmp = _io.tmp_path(path)
    _io.mkdir(tmp)
    return tmp


def save_distributed(state: Any, path: "str | os.PathLike[str]", *, group: Any = None) -> None:
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
        except Exception as e:  # noqa: BLE001
            error = e
    try:
        tmp = comm.check(error, f"save_distributed to {path}: creating a temporary directory", _NOTHING,
                         {"tmp": tmp})[0]["tmp"]
        write_distributed(state, tmp, group=group, label=f"save_distributed to {path}")
        comm.on_rank0(lambda: (_io.fsync_dir(tmp), _io.replace_dir(tmp, path, names=own_files(path))),
                      f"save_distributed to {path}: "
                      "publishing", "Rank 0 could not rename the finished directory into place: the checkpoint at "
                      "that path is the previous one or the new one, whole.")
    except BaseException:
        comm.drop_temp(tmp)
        raise
