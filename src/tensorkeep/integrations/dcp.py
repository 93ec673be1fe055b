"""torch DCP (``torch.distributed.checkpoint``) writing and reading tensorkeep checkpoints.

:class:`Writer` is a ``StorageWriter`` and :class:`Reader` a ``StorageReader``; pass them to DCP::

    import torch.distributed.checkpoint as dcp
    from tensorkeep.integrations import dcp as tk_dcp

    dcp.save(state, checkpoint_id=path, storage_writer=tk_dcp.Writer())
    dcp.load(state, checkpoint_id=path, storage_reader=tk_dcp.Reader())   # tk_dcp.latest(run): what to resume
    fut = dcp.async_save(state, checkpoint_id=path, storage_writer=tk_dcp.Writer())

DCP plans as always (flattening, de-duplication, resharding on load); what reaches the disk is
:func:`tensorkeep.save_distributed`'s layout, read by ``tk.load``, ``tk.load_distributed``, ``verify``::

    path/                        appears by one rename, after every rank's file is durable
      rank-00000-of-00002.tk     a tensorkeep file (CRC-32 per block): the chunks rank 0 was planned to write
      rank-00001-of-00002.tk
      distributed.json           JSON, sealed by a CRC-32: the layout of every tensor, the structure with
                                 every non-tensor value in it (no pickle), and under "dcp" what DCP's
                                 metadata needs: {"version", "paths": {fqn: path}, "bytes": [fqns]}

The coordinator makes a hidden temporary directory next to ``path`` in ``prepare_global_plan``, and
DCP scatters its name to every rank inside the plans; each rank writes and fsyncs its file there in
``write_data``; ``finish`` (which DCP runs on the coordinator only once every rank's ``write_data``
returned) writes ``distributed.json``, fsyncs, and renames the directory to ``path``. A crash or an
error anywhere before that leaves the previous checkpoint at ``path`` as it was.
"""

from __future__ import annotations

import dataclasses
import io
import os
import uuid
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import Metadata, StorageReader, StorageWriter
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from tensorkeep import knobs
from tensorkeep.core.dtypes import name_of_numpy, name_of_torch, torch_dtype
from tensorkeep.core.tree import flatten, unflatten
from tensorkeep.distributed.load import Checkpoint
from tensorkeep.distributed.manifest import (
    MANIFEST,
    Stored,
    assemble_manifest,
    is_shard_file,
    own_files,
    read_manifest,
    sealed_json,
    shard_file,
)
from tensorkeep.distributed.plan import Chunk
from tensorkeep.distributed.save import make_temp_dir
from tensorkeep.errors import FormatError, SaveError
from tensorkeep.file.writer import write
from tensorkeep.integrations.dcp_runs import latest
from tensorkeep.storage import local as _io

__all__ = ["Reader", "Writer", "latest"]

_STOCK = ".metadata"  # what torch's FileSystemWriter writes last: a pickle


@dataclasses.dataclass(frozen=True)
class _Target:
    """``SavePlan.storage_data`` of one rank: the temporary directory and the file to write there."""

    tmp: str
    file: str


def _abspath(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else os.path.abspath(os.fspath(path))


def _remove_temp(tmp: str) -> None:
    """Remove what a save that did not commit wrote into ``tmp`` (tensorkeep's names only)."""
    try:
        if _io.is_real_dir(tmp):
            _io.remove_own_dir(tmp, {n for n in os.listdir(tmp) if n == MANIFEST or is_shard_file(n)})
    except OSError:
        pass  # the next save to the same path removes it (remove_stale_temps)


def _value(fqn: str, obj: Any) -> tuple[Any, dict[str, Any]]:
    """A non-tensor value of the state as a tensorkeep tree node, and the arrays inside it (a tuple
    holding a tensor, NumPy's RNG state) under names that start with ``fqn``."""
    try:
        tree, arrays = flatten({fqn: obj})
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"tensorkeep's DCP writer cannot save {fqn!r}: {e}. Fix: store it as plain data (e.g. a list "
            "instead of a set, the fields of an object as a dict), or leave it out of the state"
        ) from None
    return tree["d"][0][1], dict(arrays)


def _dtype_name(a: Any) -> str | None:
    return name_of_numpy(a.dtype) if isinstance(a, np.ndarray) else name_of_torch(a.dtype)


def _own_bytes(tensors: dict[str, Any]) -> dict[str, Any]:
    """``tensors`` with a copy of each one that is the same memory as another (tied weights): a
    tensorkeep file stores such views once, under one name, and every key here needs its own."""
    _, leaves = flatten(tensors)
    kept = {name for name, _ in leaves}
    return {k: v if k in kept else (v.clone() if isinstance(v, torch.Tensor) else v.copy()) for k, v in tensors.items()}


class Writer(StorageWriter):
    """A DCP ``StorageWriter`` that writes a tensorkeep distributed checkpoint (see the module doc).

    ``path`` or DCP's ``checkpoint_id``: the directory to publish (its parent must be a file system
    every rank sees). ``durable=False`` skips the fsyncs (scratch runs). Needs DCP's default
    ``use_collectives=True``: the coordinator commits after every rank wrote.

    >>> import torch, torch.distributed.checkpoint as dcp                       # doctest: +SKIP
    >>> from tensorkeep.integrations import dcp as tk_dcp                        # doctest: +SKIP
    >>> dcp.save({"w": torch.ones(2), "step": 3}, checkpoint_id="/tmp/ck", storage_writer=tk_dcp.Writer())
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, durable: bool = True) -> None:
        super().__init__()
        self.path, self.durable = _abspath(path), durable
        self.save_id = uuid.uuid4().hex
        self._tmp: str | None = None  # the coordinator's temporary directory until it is committed
        self._cleanup: weakref.finalize | None = None

    def __getstate__(self) -> dict[str, Any]:  # DCP's PROCESS async executor pickles the writer
        return {**self.__dict__, "_tmp": None, "_cleanup": None}

    def _discard(self) -> None:
        if self._cleanup is not None:
            self._cleanup()  # runs _remove_temp once
        self._tmp, self._cleanup = None, None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self._discard()
        if checkpoint_id is not None:
            self.path = _abspath(checkpoint_id)
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self.path is None:
            raise ValueError("tensorkeep's DCP Writer has no path: pass checkpoint_id= to dcp.save, or Writer(path)")
        if not kwargs.get("use_collectives", True):
            raise ValueError(
                f"saving {self.path}: tensorkeep's DCP Writer needs use_collectives=True (the default): the "
                "coordinator publishes the checkpoint once every rank's file is on disk"
            )

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan  # nothing is created at the final path: it appears only when complete

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        assert self.path is not None  # set_up_storage_writer checked it
        if any(not p.usable for p in plans):
            raise ValueError(
                f"saving {self.path}: tensorkeep's DCP Writer gives every save a new temporary directory, "
                "which cached plans would not carry. Fix: DefaultSavePlanner(enable_plan_caching=False)"
            )
        self._discard()
        tmp = make_temp_dir(self.path)
        self._tmp, self._cleanup = tmp, weakref.finalize(self, _remove_temp, tmp)
        n = len(plans)
        return [dataclasses.replace(p, storage_data=_Target(tmp, shard_file(i, n))) for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        target = plan.storage_data
        if not isinstance(target, _Target):
            raise ValueError("tensorkeep's DCP Writer got a plan its prepare_global_plan did not make")
        tensors: dict[str, Any] = {}
        done: list[tuple[WriteItem, int, dict[str, Any]]] = []
        for item in plan.items:
            fqn = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                node, arrays = _value(fqn, self._object(planner, item))
                tensors.update(arrays)
                shapes = {k: [_dtype_name(a), list(a.shape)] for k, a in arrays.items()}
                done.append((item, 0, {"value": node, "arrays": shapes}))
                continue
            if fqn in tensors:
                raise ValueError(
                    f"saving {fqn!r}: this rank holds two chunks of it (a ShardedTensor with several local "
                    "shards?); tensorkeep's DCP Writer stores one chunk per rank. Fix: use a DTensor"
                )
            t = planner.resolve_data(item)
            assert isinstance(t, torch.Tensor)
            tensors[fqn] = t
            done.append((item, t.numel() * t.element_size(), {}))
        where: dict[str, Any] = {}
        if tensors:
            size, crc = write(
                _own_bytes(tensors),
                os.path.join(target.tmp, target.file),
                {"format": "pt"},
                self.durable,
                in_place=True,
            )
            where = {"file": target.file, "size": size, "crc32": crc}
        fut: Future[list[WriteResult]] = Future()
        fut.set_result([WriteResult(item.index, n, {**info, **where}) for item, n, info in done])
        return fut

    @staticmethod
    def _object(planner: SavePlanner, item: WriteItem) -> Any:
        """The plain value of a BYTE_IO item: from the planner when it can say (DefaultSavePlanner),
        else read back from the bytes it made, with torch's weights-only unpickler."""
        lookup = getattr(planner, "lookup_object", None)
        if lookup is not None:
            return lookup(item.index)
        data = planner.resolve_data(item)
        assert isinstance(data, io.BytesIO)
        data.seek(0)
        return torch.load(data, weights_only=True)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        assert self.path is not None and self._tmp is not None
        tmp = self._tmp
        try:
            manifest = _manifest(metadata, results)
            with _io.atomic_file(os.path.join(tmp, MANIFEST), durable=self.durable, in_place=True) as fd:
                _io.pwrite_all(fd, memoryview(sealed_json(manifest)), 0)
            read_manifest(tmp)  # never publish what loading would refuse
            if self.durable:
                _io.fsync_dir(tmp)  # the entries every rank made in it
            _io.replace_dir(tmp, self.path, self.durable, names=own_files(self.path))
        except BaseException:
            self._discard()
            raise
        if self._cleanup is not None:
            self._cleanup.detach()
        self._tmp, self._cleanup = None, None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return "://" not in os.fspath(checkpoint_id)


def _path(planner_data: Any, fqn: str) -> tuple[str | int, ...]:
    """Where DCP's default planner found ``fqn`` in the nested state (its flatten mapping), else ``(fqn,)``."""
    p = planner_data.get(fqn) if isinstance(planner_data, Mapping) else None
    if isinstance(p, tuple) and p and all(type(k) in (str, int) for k in p):
        return p
    return (fqn,)


@dataclasses.dataclass(frozen=True)
class _Node:
    node: Any  # a tensorkeep tree node


def _nest(paths: Mapping[str, tuple[str | int, ...]], nodes: Mapping[str, Any]) -> Any:
    """The tensorkeep tree of the nested state: each fqn's node placed at its path (int keys 0..n-1: a list)."""
    root: dict[Any, Any] = {}
    for fqn, path in paths.items():
        d = root
        for k in path[:-1]:
            d = d.setdefault(k, {})
            if not isinstance(d, dict):
                raise ValueError(f"DCP item {fqn!r} lies inside another item's value (path {list(path)})")
        if path[-1] in d:
            raise ValueError(f"DCP items {fqn!r} and another one have the same path {list(path)}")
        d[path[-1]] = _Node(nodes[fqn])

    def encode(x: Any) -> Any:
        if isinstance(x, _Node):
            return x.node
        if x and all(type(k) is int for k in x) and set(x) == set(range(len(x))):  # DCP's list indices
            return {"l": [encode(x[i]) for i in range(len(x))]}
        return {"d": [[k, encode(v)] for k, v in x.items()]}

    return encode(root)


def _manifest(metadata: Metadata, results: list[list[WriteResult]]) -> dict[str, Any]:
    """``distributed.json`` of a DCP save: the layout from DCP's metadata, who wrote what from ``results``."""
    files: dict[int, dict[str, Any]] = {}
    writer: dict[tuple[str, tuple[int, ...]], int] = {}  # (fqn, chunk offsets) -> rank
    values: dict[str, Any] = {}
    stored: dict[str, Stored] = {}
    inner: dict[str, Stored] = {}  # arrays inside non-tensor values
    for rank, rs in enumerate(results):
        for r in rs:
            info = r.storage_data
            if "file" in info:
                files[rank] = {"size": info["size"], "crc32": info["crc32"]}
            if "value" in info:
                values[r.index.fqn] = info["value"]
                for key, (dtype, shape) in info["arrays"].items():
                    if key in inner:
                        raise ValueError(f"cannot save: two values hold an array named {key!r}")
                    inner[key] = Stored(dtype, tuple(shape), [Chunk((0,) * len(shape), tuple(shape), rank)])
            else:
                writer[(r.index.fqn, tuple(r.index.offset or ()))] = rank
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            dtype = name_of_torch(md.properties.dtype)
            if dtype is None:
                raise TypeError(f"cannot save {fqn!r}: dtype {md.properties.dtype} is not one safetensors can store")
            chunks = []
            for c in [c for c in md.chunks if c.sizes.numel()] or md.chunks[:1]:  # empty shards hold nothing
                if (fqn, tuple(c.offsets)) not in writer:
                    raise SaveError(f"no rank reported writing the chunk at {list(c.offsets)} of {fqn!r}")
                chunks.append(Chunk(tuple(c.offsets), tuple(c.sizes), writer[(fqn, tuple(c.offsets))]))
            stored[fqn] = Stored(dtype, tuple(md.size), chunks)
    clash = set(inner) & set(stored)
    if clash:
        raise ValueError(f"cannot save: {sorted(clash)[0]!r} names both a DCP item and an array inside another one")
    paths = {fqn: _path(metadata.planner_data, fqn) for fqn in metadata.state_dict_metadata}
    lost = [fqn for fqn in paths if fqn not in stored and fqn not in values]
    if lost:
        raise SaveError(f"no rank reported writing the value of {lost[0]!r}")
    nodes = {fqn: {"t": fqn} if fqn in stored else values[fqn] for fqn in paths}
    dcp = {"version": metadata.version, "paths": {k: list(p) for k, p in paths.items()}, "bytes": sorted(values)}
    return assemble_manifest(len(results), files, {**stored, **inner}, _nest(paths, nodes), {"dcp": dcp})


def _nodes(tree: Any) -> dict[tuple[str | int, ...], Any]:
    """Every node of a tensorkeep tree (checked by ``read_manifest``) by its path: dict keys, list indices."""
    out: dict[tuple[str | int, ...], Any] = {}
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), tree)]
    while stack:
        path, n = stack.pop()
        out[path] = n
        if type(n) is dict and len(path) <= knobs.MAX_DEPTH:
            for tag, v in n.items():
                if tag in ("d", "o") and type(v) is list:
                    stack.extend(
                        (path + (kv[0],), kv[1])
                        for kv in v
                        if type(kv) is list and len(kv) == 2 and type(kv[0]) in (str, int)
                    )
                elif tag in ("l", "u") and type(v) is list:
                    stack.extend((path + (i,), x) for i, x in enumerate(v))
    return out


def _refuse_stock(path: str) -> None:
    if not os.path.exists(os.path.join(path, MANIFEST)) and os.path.exists(os.path.join(path, _STOCK)):
        raise FormatError(
            f"{path} was written by torch DCP's own FileSystemWriter: its {_STOCK} is a pickle, which "
            f"tensorkeep never unpickles, so tensorkeep's Reader does not read it. Fix: convert it once, "
            f"nothing unpickled: tk.convert_dcp({path!r}, 'converted.tk') (or `tensorkeep convert {path} "
            "converted.tk`), then tk.load('converted.tk'); new checkpoints: dcp.save(..., storage_writer=Writer())"
        )


class Reader(StorageReader):
    """A DCP ``StorageReader`` for checkpoints :class:`Writer` wrote: every file's size and header
    checksum checked before it is read, every block's CRC-32 as it is read (a damaged file raises
    :class:`~tensorkeep.ChecksumError` / :class:`~tensorkeep.FormatError`, which DCP wraps in its
    ``CheckpointException``); each rank reads only the rows its tensors need (resharding is DCP's).
    A directory written by stock DCP raises :class:`~tensorkeep.FormatError` naming ``tk.convert_dcp``.

    >>> dcp.load(state, checkpoint_id="/tmp/ck", storage_reader=tk_dcp.Reader())   # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        self.path = _abspath(path)
        self._ck: Checkpoint | None = None
        self._nodes: dict[tuple[str | int, ...], Any] = {}  # the stored structure's nodes by path
        if self.path is not None:
            _refuse_stock(self.path)

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Called by ``dcp.load`` before anything collective: a wrong directory raises here, unwrapped."""
        self._close()
        if checkpoint_id is not None:
            self.path = _abspath(checkpoint_id)
        if self.path is not None:
            self._open()

    def _open(self) -> Checkpoint:
        if self._ck is None:
            if self.path is None:
                raise ValueError(
                    "tensorkeep's DCP Reader has no path: pass checkpoint_id= to dcp.load, or Reader(path)"
                )
            _refuse_stock(self.path)
            ck = Checkpoint(self.path)
            try:
                self._nodes = _nodes(ck.manifest["tree"])
                self._check_dcp(ck, self._nodes)
            except BaseException:
                ck.close()
                raise
            self._ck = ck
        return self._ck

    def _close(self) -> None:
        if self._ck is not None:
            self._ck.close()
            self._ck, self._nodes = None, {}

    @staticmethod
    def _check_dcp(ck: Checkpoint, nodes: Mapping[tuple[str | int, ...], Any]) -> None:
        d = ck.manifest.get("dcp")
        where = os.path.join(ck.path, MANIFEST)
        if d is None:
            raise FormatError(
                f"{ck.path} was written by tk.save_distributed, not through DCP. Fix: "
                "tk.load_distributed(state, path) reads it (any world size)"
            )
        paths, nbytes = d.get("paths") if isinstance(d, dict) else None, d.get("bytes") if isinstance(d, dict) else None
        if not isinstance(paths, dict) or not isinstance(nbytes, list) or not set(nbytes) <= set(paths):
            raise FormatError(f"{where}: 'dcp' needs 'paths' (fqn -> path) and 'bytes' (fqns among them)")
        for fqn, p in paths.items():
            if type(p) is not list or not p or any(type(k) not in (str, int) for k in p):
                raise FormatError(f"{where}: the path of {fqn!r} must be a non-empty list of str and int")
            node = nodes.get(tuple(p))
            if node is None and tuple(p) not in nodes:
                raise FormatError(f"{where}: the structure has nothing at {p} ({fqn!r})")
            if fqn not in nbytes and not (isinstance(node, dict) and node.get("t") == fqn):
                raise FormatError(f"{where}: the structure holds {node!r:.60} at {p}, not the tensor {fqn!r}")

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise FormatError(f"{self.path}: a tensorkeep checkpoint has one {MANIFEST} for every rank")
        ck = self._open()
        d = ck.manifest["dcp"]
        items: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
        for fqn in d["paths"]:
            if fqn in d["bytes"]:
                items[fqn] = BytesStorageMetadata()
                continue
            st = ck.tensors[fqn]
            items[fqn] = TensorStorageMetadata(
                TensorProperties(dtype=torch_dtype(st.dtype)),
                torch.Size(st.shape),
                [ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in st.chunks],
            )
        return Metadata(
            items,
            planner_data={fqn: tuple(p) for fqn, p in d["paths"].items()},
            storage_meta=StorageMeta(checkpoint_id=self.path, load_id=uuid.uuid4().hex),
            version=d.get("version") if isinstance(d.get("version"), str) else None,
        )

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        ck = self._open()
        try:
            paths = ck.manifest["dcp"]["paths"]
            for item in plan.items:
                fqn = item.storage_index.fqn
                if item.type == LoadItemType.BYTE_IO:
                    buf = io.BytesIO()  # plain data this process just read and checked, for the planner's torch.load
                    torch.save(unflatten(self._nodes[tuple(paths[fqn])], ck.full, ck.path), buf)
                    buf.seek(0)
                    planner.load_bytes(item, buf)
                    continue
                at = tuple(o + s for o, s in zip(item.storage_index.offset or (), item.storage_offsets))
                target = planner.resolve_tensor(item).detach()
                ck.read_box(fqn, (at, tuple(item.lengths)), target)
                planner.commit_tensor(item, target)
        finally:
            self._close()
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return os.path.isfile(os.path.join(os.fspath(checkpoint_id), MANIFEST))
