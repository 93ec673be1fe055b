"""CheckpointManager with torch.distributed: save and restore as collectives over every rank.

With a process group of two or more ranks, a checkpoint directory holds every rank's shard:

    run/step_00000500/
      rank-00000-of-00004.tk ...   each rank's share, written in parallel (tensorkeep.distributed.save):
                                   replicated tensors once, DTensor shards as local shards
      distributed.json             the layout of every tensor and the structure
      rng-00000.tk ...             each rank's own RNG states
      manifest.json                written last, by rank 0: every file above with its size

The order of a save: rank 0 makes the temporary directory; every rank writes and fsyncs its
files; rank 0 writes the manifest and publishes the directory by rename. Every step ends with an
all-gather of each rank's outcome over a gloo group of the manager's own (``Comm.check``), so
a failure on any rank raises :class:`SaveError` on every rank and nothing is published. Only
rank 0 holds the run's lock, removes leftovers of crashed saves and applies retention; every
rank keeps the same list of steps. A restore agrees on one step: the cheap checks (manifest,
sizes, header checksums) first, then the load itself; a damaged checkpoint anywhere moves every
rank to the previous one together. Loading reshards: any world size, or one process.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from tensorkeep import errors
from tensorkeep.checkpoint import layout, packs, rng
from tensorkeep.checkpoint.policies import Policy
from tensorkeep.checkpoint.records import Records
from tensorkeep.checkpoint.run import Run
from tensorkeep.checkpoint.state import apply, has_state
from tensorkeep.checkpoint.steps import KINDS, LAYOUT, is_distributed, layout_entry, rng_file
from tensorkeep.core.dtypes import torch_dtype
from tensorkeep.distributed.comm import Comm, dtensor_type
from tensorkeep.distributed.load import load_distributed
from tensorkeep.distributed.manifest import read_manifest as read_layout
from tensorkeep.distributed.save import write_distributed
from tensorkeep.errors import CheckpointNotFoundError, FormatError, SaveError, StorageError, TensorkeepError
from tensorkeep.file.reader import read_file as load
from tensorkeep.file.writer import write
from tensorkeep.storage import local as _io

T = TypeVar("T")


def _timeout() -> Any:
    """The default process group's timeout, so the status group gives up as soon as training would."""
    import torch.distributed as dist

    pg = dist.distributed_c10d._get_default_group()
    for dev in ("cpu", "cuda"):
        try:
            return pg._get_backend(torch.device(dev)).options._timeout
        except Exception:
            continue
    return None


def gather(comm: Comm | None, value: Any, what: str) -> list[Any]:
    """Every rank's ``value`` (JSON), in rank order (``[value]`` without ``comm``); :class:`TensorkeepError`
    when another rank is gone.

    >>> gather(None, {"step": 3}, "x")
    [{'step': 3}]
    """
    if comm is None:
        return [value]
    try:
        return comm.all_gather(value)
    except Exception as e:
        raise TensorkeepError(
            f"{what}: rank {comm.rank} of {comm.world} lost contact with the other ranks ({e}). "
            "Another rank probably died or timed out"
        ) from e


def is_damage(error: BaseException) -> bool:
    """A damaged or missing checkpoint (skip it), not an unreachable store, the state or the code."""
    return isinstance(error, (FormatError, OSError)) and not isinstance(error, StorageError)


def status(error: BaseException | None) -> dict[str, Any]:
    """One rank's outcome as JSON, for :func:`gather`."""
    if error is None:
        return {"error": None, "damage": False}
    return {"error": f"{type(error).__name__}: {error}", "type": type(error).__name__, "damage": is_damage(error)}


def raise_first(comm: Comm, statuses: list[dict], error: BaseException | None, what: str) -> None:
    """If any rank failed: this rank's own error, or the same kind of error naming the failing rank
    (a damaged checkpoint counts only when nothing worse happened)."""
    failed = [(r, s) for r, s in enumerate(statuses) if s["error"]]
    if not failed:
        return
    worse = [(r, s) for r, s in failed if not s["damage"]]
    if error is not None and (not worse or not is_damage(error)):
        raise error
    r, s = (worse or failed)[0]
    cls = vars(errors).get(s["type"])
    if not (isinstance(cls, type) and issubclass(cls, TensorkeepError)):
        cls = TensorkeepError
    raise cls(f"{what} failed on rank {r} of {comm.world}: {s['error']}")


def collectively(comm: Comm | None, fn: Callable[[], T], what: str) -> T:
    """``fn()`` on every rank of ``comm`` (a collective); when it raised anywhere, every rank raises:
    its own error, or the same kind of error naming the failing rank. Without ``comm``: ``fn()``.

    >>> collectively(None, lambda: 3, "reading")
    3
    """
    if comm is None or comm.world == 1:
        return fn()
    result: Any = None
    error: BaseException | None = None
    try:
        result = fn()
    except Exception as e:
        error = e
    raise_first(comm, gather(comm, status(error), what), error, what)
    return result


def _tag(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as JSON (a NaN loss as {"$float": "nan"}), as the manifest stores them."""
    return {k: {"$float": repr(v)} if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


def _untag(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: float(v["$float"]) if isinstance(v, dict) else v for k, v in metrics.items()}


# ------------------------------------------------------------------------------------ opening


@dataclass
class Group:
    """What the collective functions need of a manager, passed explicitly: its status group, its
    run, its records, and how it builds a manifest and deletes checkpoints on rank 0."""

    comm: Comm
    run: Run  #: a directory (join refuses object storage)
    records: Records
    durable: bool
    manifest: Callable[[int, dict[str, Any]], layout.Manifest]
    prune: Callable[[Sequence[Policy] | None, bool], list[int]]

    @property
    def directory(self) -> str:
        return self.run.url


def join(directory: str, *, async_save: bool | str, incremental: bool, local: bool) -> Comm | None:
    """The status group of a manager when torch.distributed runs two or more ranks, else None.

    Collective when it returns a group: every rank must create its manager at the same point."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    comm = Comm(dist.new_group(backend="gloo", timeout=_timeout()))  # status traffic apart from training's
    mine = {"directory": directory, "async_save": async_save, "incremental": incremental, "remote": not local}
    every = gather(comm, mine, f"opening {directory}")
    first = every[0]
    if first["async_save"]:
        raise ValueError(
            f"async_save=True is not supported with torch.distributed ({comm.world} ranks): the background writer "
            "would run the ranks' status collectives concurrently with training's, and DTensor shards would have "
            "to be snapshotted first. Use async_save=False: every rank writes only its own shard, in parallel"
        )
    if first["incremental"]:
        raise ValueError(
            f"incremental=True is not supported with torch.distributed ({comm.world} ranks) yet; use incremental=False"
        )
    if first["remote"]:
        raise ValueError(
            f"{directory}: object storage is not supported with torch.distributed ({comm.world} ranks) "
            "yet; save to a directory on a file system every rank sees"
        )
    for r, s in enumerate(every):
        if s != first:
            raise ValueError(
                f"rank {r} opened CheckpointManager with {s}, rank 0 with {first}: every rank must open "
                "the same run directory with the same settings"
            )
    return comm


def open_run(g: Group) -> None:
    """Rank 0 takes the run's lock and removes leftovers of crashed saves; every rank reads the records."""
    comm, error = g.comm, None
    if comm.rank == 0:
        try:
            g.run.lock.acquire()
            g.run.clean()  # unfinished saves of a crashed run: only its own
        except Exception as e:
            error = e
    what = f"opening {g.directory}"
    raise_first(comm, gather(comm, status(error), what), error, what)
    for s, m in g.run.manifests().items():
        g.records.set(s, m.metrics)
    seen = gather(comm, g.records.steps(), what)
    for r, steps in enumerate(seen):
        if steps != seen[0]:
            raise TensorkeepError(
                f"{what}: rank {r} sees the checkpoints {steps}, rank 0 sees {seen[0]}. Every rank "
                "must use the same directory, on a file system every rank sees"
            )


def should_save(comm: Comm, due: bool, signalled: int | None) -> tuple[bool, int | None]:
    """Whether any rank wants a checkpoint now (clocks and signals differ between ranks), and the
    signal to exit with: one that reached one rank counts for all, so every rank exits after it."""
    every = gather(comm, {"due": due, "signal": signalled}, "should_save")
    signals = [s["signal"] for s in every if s["signal"] is not None]
    return any(s["due"] for s in every), signalled if signalled is not None else (signals[0] if signals else None)


# --------------------------------------------------------------------------------------- save


def _payload(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """(key -> state_dict() or value, key -> kind, this rank's RNG states), without moving any RNG."""
    if not isinstance(state, Mapping):
        raise TypeError("state must be a dict such as {'model': net, 'optimizer': opt, 'epoch': 3}")
    payload: dict[str, Any] = {}
    kinds: dict[str, str] = {}
    rng_state = rng.capture()  # first: some state_dict() calls draw random numbers
    try:
        for key, obj in state.items():
            if type(key) is not str:
                raise TypeError(f"state keys must be str, got {key!r}")
            stateful = has_state(obj)
            payload[key] = obj.state_dict() if stateful else obj
            kinds[key] = KINDS[0] if stateful else KINDS[1]
    finally:
        rng.restore(rng_state)
    return payload, kinds, rng_state


def save(g: Group, step: int, state: Mapping[str, Any], metrics: dict[str, Any]) -> str:
    """Collective: write a checkpoint of ``state`` from every rank; commit it only if every rank succeeded
    (then every rank records it; the caller applies retention)."""
    comm = g.comm
    what = f"checkpoint step {step}"
    outcome = f"Nothing was committed: every committed checkpoint in {g.directory} is intact."
    error: BaseException | None = None
    payload: dict[str, Any] = {}
    kinds: dict[str, str] = {}
    rng_state: dict[str, Any] | None = None
    tmp = ""
    try:
        payload, kinds, rng_state = _payload(state)
        if comm.rank == 0:
            tmp = _io.tmp_path(g.run.step_path(step))
            _io.mkdir(tmp)
    except Exception as e:
        error = e
    try:
        every = comm.check(error, f"{what}: preparing", outcome, {"step": step, "tmp": tmp, "metrics": _tag(metrics)})
        steps = [s["step"] for s in every]
        if len(set(steps)) > 1:
            raise SaveError(
                f"{what}: the ranks called save() with different steps, {steps} by rank. Every rank "
                f"must save the same step. {outcome}"
            )
        tmp = every[0]["tmp"]
        write_distributed(payload, tmp, group=comm.group, label=what, outcome=outcome, durable=g.durable)
        error, info = None, {}
        try:
            p = os.path.join(tmp, rng_file(comm.rank))
            size, crc = write(rng_state, p, {}, g.durable, in_place=True)
            info = {"size": size, "crc32": crc}
        except Exception as e:
            error = e
        rngs = comm.check(error, f"{what}: writing the RNG states", outcome, info)
        final = g.run.step_path(step)
        comm.on_rank0(
            lambda: _publish(g, step, tmp, final, metrics, kinds, rngs),
            f"{what}: publishing",
            "Rank 0 could not publish it: the previous checkpoints are intact, and this one is either "
            "whole or absent (list_checkpoints tells).",
        )
    except BaseException:
        comm.drop_temp(tmp)
        raise
    metrics.clear()
    metrics.update(_untag(every[0]["metrics"]))  # rank 0's metrics, on every rank
    return final


def _publish(
    g: Group, step: int, tmp: str, final: str, metrics: dict[str, Any], kinds: dict[str, str], rngs: list[dict]
) -> None:
    """Rank 0, once every rank's files are durable: the manifest, then the rename that commits."""
    shards, _ = read_layout(tmp)  # the shard files' sizes and header checksums, as each rank reported them
    m = g.manifest(step, metrics)
    for name, info in shards["files"].items():
        m.files[name] = {"size": info["size"], "crc32": info["crc32"], "key": "", "kind": "distributed"}
    m.files[LAYOUT] = {
        "size": os.path.getsize(os.path.join(tmp, LAYOUT)),
        "key": "",
        "kind": "distributed",
        "world_size": len(rngs),
        "keys": kinds,
    }
    for r, info in enumerate(rngs):
        m.files[rng_file(r)] = {"size": info["size"], "crc32": info["crc32"], "key": "", "kind": "rng-rank", "rank": r}
    layout.write_manifest(tmp, m, g.durable)
    if g.durable:
        _io.fsync_dir(tmp)
    _io.replace_dir(tmp, final, g.durable, layout.replaceable(final))


def prune(g: Group, policies: Sequence[Policy] | None, dry_run: bool, what: str = "prune") -> list[int]:
    """Rank 0 applies retention; every rank drops the same steps from its records."""
    comm = g.comm
    error, doomed = None, []
    if comm.rank == 0:
        try:
            doomed = g.prune(policies, dry_run)
        except Exception as e:
            error = e
    every = comm.check(error, what, "", {"doomed": doomed})
    if not dry_run and comm.rank != 0:
        for s in every[0]["doomed"]:
            g.records.drop(s)
    return list(every[0]["doomed"])


# ------------------------------------------------------------------------------------ restore


def _fresh_optimizer(opt: Any, sd: dict, key: str, stored: dict[str, Any]) -> None:
    """A fresh optimizer has no state to load into: the saved state tensors of its DTensor
    parameters (FSDP2) get DTensor targets with the parameter's placements, so each rank reads
    only its shard and the optimizer's state comes back sharded like its parameters."""
    dt = dtensor_type()
    if dt is None or not isinstance(sd.get("state"), dict):
        return
    params = [p for g in opt.param_groups for p in g["params"]]
    for pid, p in enumerate(params):
        if not isinstance(p, dt) or pid in sd["state"]:
            continue
        prefix = f"{key}.state.{pid}."
        entry = {
            name[len(prefix) :]: torch.empty_like(p, dtype=torch_dtype(s.dtype))
            for name, s in stored.items()
            if name.startswith(prefix) and "." not in name[len(prefix) :] and s.shape == tuple(p.shape)
        }
        if entry:
            sd["state"][pid] = entry


def _load_shards(state: Mapping[str, Any], d: str, m: layout.Manifest, comm: Comm) -> dict[str, Any] | None:
    """This rank's part of a distributed checkpoint, loaded into ``state`` (in place, resharded);
    returns this rank's RNG states when the world size is the saved one."""
    keys, world = layout_entry(d, m)
    _, stored = read_layout(d)
    target: dict[str, Any] = {}
    for key, obj in state.items():
        if has_state(obj) and keys.get(key) == "state_dict":
            target[key] = obj.state_dict()
            if isinstance(obj, torch.optim.Optimizer):
                _fresh_optimizer(obj, target[key], key, stored)
        elif not has_state(obj) and keys.get(key) == "values":
            target[key] = obj
    missing = [k for k in state if k not in target]
    if missing and comm.rank == 0:
        warnings.warn(
            f"checkpoint step {m.step} has nothing for {missing}; they keep their current values", stacklevel=4
        )
    mine = None
    if world == comm.world and rng_file(comm.rank) in m.files:
        mine = load(os.path.join(d, rng_file(comm.rank)))  # verified before anything is applied
    load_distributed(target, d)
    for key, obj in state.items():
        if key in target and has_state(obj):
            obj.load_state_dict(target[key])
        elif key in target and isinstance(state, dict):
            state[key] = target[key]
    if world != comm.world and comm.rank == 0:
        warnings.warn(
            f"checkpoint step {m.step} was saved by {world} ranks, this run has {comm.world}: the RNG "
            "states are not restored (each rank keeps its own)",
            stacklevel=4,
        )
    return mine


def _load_plain(g: Group, state: Mapping[str, Any], d: str, m: layout.Manifest) -> None:
    """A checkpoint saved by one process, restored on every rank (replicated state, e.g. DDP);
    its RNG states are one process's, so they are not restored."""
    loaded = {  # verified before anything is applied (kind "file" entries: checked whole by check_files)
        name: load(os.path.join(d, name)) for name, i in m.files.items() if i.get("kind") != layout.FILE_KIND
    }
    loaded.update(packs.load_parts(m.parts, packs.locate_local(g.directory, m.packs, d), d))
    loaded = layout.unbundle(m, loaded, d)  # a one-file checkpoint's parts, by part name
    files = {n: i for n, i in m.files.items() if i.get("kind") != "rng"}
    bundled = {n: i for n, i in m.bundled.items() if i.get("kind") != "rng"}
    apply(state, dataclasses.replace(m, files=files, bundled=bundled), loaded)
    if g.comm.rank == 0:
        warnings.warn(
            f"checkpoint step {m.step} was saved by one process: the RNG states are not restored (each "
            "rank keeps its own)",
            stacklevel=4,
        )


def restore(g: Group, state: Mapping[str, Any], step: int | None) -> int | None:
    """Collective: every rank restores the same step (the newest one intact on every rank)."""
    comm, directory = g.comm, g.directory
    steps = gather(comm, g.run.steps(), f"restoring from {directory}")
    if any(s != steps[0] for s in steps):
        raise TensorkeepError(
            f"restoring from {directory}: the ranks see different checkpoints {steps}. Every "
            "rank must use the same directory, on a file system every rank sees"
        )
    touched = False
    for s in [step] if step is not None else sorted(steps[0], reverse=True):
        d = g.run.step_path(s)
        what = f"restoring checkpoint step {s} from {directory}"
        error, m, mine = None, None, None
        try:
            if not os.path.isdir(d):
                raise FormatError(f"{d}: no such checkpoint")
            m = layout.read_manifest(d)
            layout.check_files(d, m)
        except Exception as e:
            error = e
        bad = damaged_anywhere(comm, error, what)
        if not bad:
            error = None
            try:
                if is_distributed(m):  # type: ignore[arg-type]
                    mine = _load_shards(state, d, m, comm)  # type: ignore[arg-type]
                else:
                    _load_plain(g, state, d, m)  # type: ignore[arg-type]
            except Exception as e:
                error = e
            bad = damaged_anywhere(comm, error, what)
            touched = touched or bad is not None
        if bad is None:
            if mine is not None:
                rng.restore(mine)  # last: nothing above may consume randomness afterwards
            return s
        if step is not None:
            raise CheckpointNotFoundError(
                f"cannot restore step {step} from {directory}: {bad}. Steps that exist: "
                f"{g.records.steps()}" + (". The state may be partly loaded" if touched else "")
            )
        if comm.rank == 0:
            warnings.warn(f"skipping damaged checkpoint {d}: {bad}; trying the previous one", stacklevel=3)
        g.records.drop(s)
    if touched:
        raise CheckpointNotFoundError(
            f"restoring from {directory}: no intact checkpoint is left, and the state "
            "was partly loaded from a damaged one. Build the objects afresh to start over"
        )
    if steps[0] and comm.rank == 0:
        warnings.warn(
            f"{directory}: ALL {len(steps[0])} checkpoint(s) are damaged (steps {steps[0]}): nothing "
            "was restored, so restore() returns None and training would start from scratch. Fix: run "
            f"`tensorkeep verify {directory}`, put back a good copy, or pass step= to see the error",
            stacklevel=3,
        )
    return None


def damaged_anywhere(comm: Comm, error: BaseException | None, what: str) -> str | None:
    """Every rank's outcome (a collective): None if all succeeded, a description if a checkpoint is
    damaged somewhere; any other error (a state that does not fit) is raised on every rank."""
    every = gather(comm, status(error), what)
    failed = [(r, s) for r, s in enumerate(every) if s["error"]]
    if not failed:
        return None
    if not all(s["damage"] for _, s in failed):
        raise_first(comm, every, error, what)
    r, s = failed[0]
    return f"rank {r}: {s['error']}"
