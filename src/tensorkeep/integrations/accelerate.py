"""Crash-proof ``Accelerator.save_state`` / ``load_state``: atomic, durable, checksummed, no pickle.

Two lines for existing code::

    from tensorkeep import accelerate as tk_acc
    accelerator = Accelerator(...)
    tk_acc.protect(accelerator)       # accelerator.save_state / load_state are now the functions below

or call them explicitly: ``tk_acc.save_state(accelerator, path)``, ``tk_acc.load_state(accelerator, path)``.
``tk_acc.protect(accelerator, async_save=True)`` (one process): ``save_state`` returns once the state
is copied into reused staging buffers, and a background thread writes and commits the checkpoint.

They use what the ``Accelerator`` registered (prepared models, optimizers, schedulers, dataloaders,
the grad scaler, objects of ``register_for_checkpointing``, the save/load pre-hooks) and write one
checkpoint directory through :mod:`tensorkeep.checkpoint.stage`: it appears whole, under its final
name, only once every file and its ``manifest.json`` are fsynced. What changes from stock:

* files: ``model.safetensors`` (a tensorkeep file: safetensors readers load it), ``optimizer.tk``,
  ``scheduler.tk``, ``dataloader.tk`` (epoch, seedable sampler, stateful dataloader position),
  ``scaler.tk``, ``custom_checkpoint_0.tk``, ``random_states_0.tk`` (Python, NumPy, torch, CUDA
  RNGs and ``accelerator.step``): no pickle is written or read. Index ``_1``, ``_2`` as stock.
* several processes (DDP): a save is a collective (:mod:`tensorkeep.checkpoint.stage`): the main
  process writes the models, optimizers, schedulers, scaler and custom objects, every process its
  ``random_states_{i}.tk`` and its own dataloader positions (``dataloader_rank{i}.tk``); rank 0
  commits once every process's files are durable, and a failure anywhere raises
  :class:`~tensorkeep.SaveError` everywhere with nothing published. ``load_state`` loads the same
  checkpoint on every process (the newest intact on every process) and resumes with the same number
  of processes. The directory must be on a file system every process sees.
* ``ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=N)``: ``checkpoint_{i}``
  under ``project_dir/checkpoints``; old ones are deleted only *after* the new one is committed;
  ``load_state()`` picks the newest checkpoint that verifies (a damaged one is skipped with a
  warning) and sets ``project_configuration.iteration`` past every existing checkpoint.
* a damaged or missing file (RNG states included) is an error, never silently skipped; a stock
  folder (pickles) is refused: load it once with ``Accelerator.load_state(accelerator, path)``.
* ``load_state`` returns the directory it loaded (None when automatic naming finds none).

Not supported (refused with :class:`NotImplementedError`): FSDP, DeepSpeed, Megatron-LM, XLA, and
``save_on_each_node=True`` with several processes. Files written into the checkpoint by a save
pre-hook must be plain files (no subdirectories); with several processes a hook runs on every process,
so only one of them may write a given file name. ``safe_serialization``, ``load_kwargs``,
``map_location`` are accepted and ignored.
"""

from __future__ import annotations

import os
import types
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from tensorkeep.checkpoint import layout, rng
from tensorkeep.checkpoint.background import Background, check_mode
from tensorkeep.checkpoint.collective import collectively, gather
from tensorkeep.checkpoint.intact import Intact, latest_intact
from tensorkeep.checkpoint.manager import CheckpointManager
from tensorkeep.checkpoint.naming import Naming
from tensorkeep.checkpoint.stage import Stage, read_dir, stage
from tensorkeep.distributed.comm import Comm
from tensorkeep.errors import CheckpointNotFoundError, FormatError, MismatchError

try:
    from accelerate import Accelerator
    from accelerate.data_loader import SeedableRandomSampler, get_sampler
    from accelerate.utils import DistributedType
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError("tensorkeep.accelerate needs Accelerate: pip install 'tensorkeep[accelerate]'") from e

__all__ = ["save_state", "load_state", "protect", "wait", "latest", "NAMING"]

NAMING = "checkpoint_{step}"  #: Accelerate's automatic checkpoint names
_BY = "tensorkeep.accelerate"
_WARNED: weakref.WeakSet[Accelerator] = weakref.WeakSet()
_RUNS: weakref.WeakKeyDictionary[Accelerator, tuple[str, int | None, CheckpointManager]] = weakref.WeakKeyDictionary()
_ASYNC: weakref.WeakKeyDictionary[Accelerator, bool | str] = weakref.WeakKeyDictionary()  # protect(..., async_save)
_WRITERS: weakref.WeakKeyDictionary[Accelerator, Background] = weakref.WeakKeyDictionary()  # explicit output_dir


def save_state(
    accelerator: Accelerator,
    output_dir: str | os.PathLike[str] | None = None,
    safe_serialization: bool = True,
    **kw: Any,
) -> str:
    """``accelerator.save_state(output_dir)``, crash-proof; returns the checkpoint's directory.

    >>> import torch; from accelerate import Accelerator
    >>> acc = Accelerator(cpu=True)
    >>> net, opt = acc.prepare(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
    >>> sorted(os.listdir(save_state(acc, "/tmp/tk-doc-acc/ckpt")))
    ['manifest.json', 'model.safetensors', 'optimizer.tk', 'random_states_0.tk']
    """
    _check(accelerator)
    pc = accelerator.project_configuration
    it, later = pc.iteration, _ASYNC.get(accelerator, False)
    lazy = list(accelerator._optimizers) if later == "lazy" else []  # what they step, and their state
    if pc.automatic_checkpoint_naming:
        mgr = _manager(accelerator)
        if os.path.lexists(mgr.path(it)):
            raise ValueError(
                f"Checkpoint directory {mgr.path(it)} ({it}) already exists. Fix: resume with "
                "load_state() first (it sets project_configuration.iteration), or set it yourself"
            )
        with mgr.stage(it, by=_BY, defer=bool(later), lazy=lazy) as st:
            _write(accelerator, st)
    else:
        if output_dir is None:
            raise ValueError("save_state needs output_dir, or ProjectConfiguration(automatic_checkpoint_naming=True)")
        bg = _writer(accelerator) if later else None
        if bg is not None:
            bg.wait()  # one save in flight: its staging buffers are reused, its error raises here
        final = os.path.expanduser(os.fspath(output_dir))
        with stage(final, it, by=_BY, comm=_comm(accelerator), defer=bool(later)) as st:
            _write(accelerator, st)
        if bg is not None:
            bg.later(st, lazy=lazy)
    pc.iteration += 1
    return st.final


def load_state(
    accelerator: Accelerator,
    input_dir: str | os.PathLike[str] | None = None,
    load_kwargs: dict | None = None,
    **load_model_func_kwargs: Any,
) -> str | None:
    """``accelerator.load_state(input_dir)`` of a checkpoint :func:`save_state` wrote: everything read
    and verified first, then applied (hooks, models, optimizers, schedulers, dataloaders, scaler,
    custom objects, ``accelerator.step``, RNG states last). Returns the directory loaded.

    Without ``input_dir`` (automatic naming): the newest checkpoint that verifies, or None if there is
    none. A damaged ``input_dir`` raises :class:`~tensorkeep.CheckpointNotFoundError`.
    ``load_model_func_kwargs``: ``strict=False`` is passed to the models' ``load_state_dict``.
    """
    _check(accelerator)
    wait(accelerator)  # an asynchronous save in flight is committed first (its error raises here)
    pc, comm = accelerator.project_configuration, _comm(accelerator)
    if input_dir is not None:
        d = os.path.expanduser(os.fspath(input_dir))
        found = collectively(comm, lambda: _read(d), f"loading {d}")  # damaged on any process: all raise
    elif pc.automatic_checkpoint_naming:
        mgr = _manager(accelerator)  # takes the run and removes leftovers of crashed saves first
        maybe = latest_intact(mgr.directory, naming=NAMING, comm=mgr.comm)  # the same one on every process
        if maybe is None:
            return None
        found = maybe
    else:
        raise ValueError("No input_dir provided and automatic checkpoint naming is disabled.")
    strict = bool(load_model_func_kwargs.get("strict", True))
    collectively(comm, lambda: _apply(accelerator, found, strict), f"loading {found.path}")
    if pc.automatic_checkpoint_naming:
        names = os.listdir(_manager(accelerator).directory)
        after = 1 + max((n for n in map(Naming(NAMING).number, names) if n is not None), default=-1)
        pc.iteration = gather(comm, after, "load_state")[0]  # rank 0's: every process saves the same next
    return found.path


def protect(accelerator: Accelerator, *, async_save: bool | str = False) -> Accelerator:
    """Make ``accelerator.save_state`` / ``load_state`` these functions (on this instance); returns it.

    ``async_save=True`` (one process): ``save_state`` copies the state into staging buffers reused
    from one save to the next and returns; a background thread writes and commits the checkpoint
    (and applies ``total_limit``). One save is in flight at a time: the next ``save_state``,
    ``load_state`` and :func:`wait` wait for it and raise its error. It costs host memory the size
    of the state. The returned folder appears only when its write is committed: call :func:`wait`
    before writing into it or reading it (``tokenizer.save_pretrained(out)``). ``async_save="lazy"``:
    the parameters the optimizers step and their state are copied by that thread too, and the next
    optimizer step waits until it has; ``save_state`` then blocks only for the rest.

    >>> from accelerate import Accelerator
    >>> acc = protect(Accelerator(cpu=True))
    >>> acc.save_state.__func__ is save_state
    True
    """
    check_mode(async_save)
    if async_save and accelerator.num_processes > 1:
        raise ValueError(
            f"tensorkeep.accelerate: async_save=True runs with one process; this Accelerator has "
            f"{accelerator.num_processes}. Fix: protect(accelerator) (synchronous, collective over the processes)"
        )
    wait(accelerator)
    _ASYNC[accelerator] = async_save
    accelerator.save_state = types.MethodType(save_state, accelerator)
    accelerator.load_state = types.MethodType(load_state, accelerator)
    return accelerator


def wait(accelerator: Accelerator) -> None:
    """Block until the asynchronous save in flight (``protect(..., async_save=True)``) is committed;
    raise its error (that checkpoint was then not published). A no-op otherwise.

    >>> wait(acc)  # doctest: +SKIP
    """
    held = _RUNS.get(accelerator)
    if held is not None:
        held[2].wait()
    bg = _WRITERS.get(accelerator)
    if bg is not None and not bg.forked:
        bg.wait()


def latest(directory: str | os.PathLike[str], naming: str = "checkpoint-{step}") -> str | None:
    """The newest checkpoint under ``directory`` named by ``naming`` that verifies (damaged ones skipped
    with a warning), or None: for scripts that name their own folders, ``save_state(f"out/checkpoint-{step}")``.
    """
    found = latest_intact(os.fspath(directory), naming=naming)
    return None if found is None else found.path


# ---------------------------------------------------------------------------------------------- save


def _name(base: str, i: int, ext: str = ".tk") -> str:
    return f"{base}{ext}" if i == 0 else f"{base}_{i}{ext}"


def _loader_name(acc: Accelerator, i: int) -> str:
    """A dataloader's position: one file, or one per process (each process has its own position)."""
    return _name("dataloader", i) if acc.num_processes == 1 else _name("dataloader", i, f"_rank{acc.process_index}.tk")


def _write(acc: Accelerator, st: Stage) -> None:
    """Every registered state into ``st`` (shared state by the main process, its own by every process);
    no RNG stream moves (some ``state_dict()`` draw numbers)."""
    rng_state = rng.capture()
    files: dict[str, Any] = {}
    try:
        weights = [acc.get_state_dict(m, unwrap=False) for m in acc._models]  # on every process, as stock
        for hook in acc._save_model_state_pre_hook.values():  # they may save models themselves and pop them
            hook(acc._models, weights, st.path)
        if acc.is_main_process:
            files.update({_name("model", i, ".safetensors"): sd for i, sd in enumerate(weights)})
            files.update({_name("optimizer", i): o.state_dict() for i, o in enumerate(acc._optimizers)})
            files.update({_name("scheduler", i): s.state_dict() for i, s in enumerate(acc._schedulers)})
            if acc.scaler is not None:
                files["scaler.tk"] = acc.scaler.state_dict()
            files.update({f"custom_checkpoint_{i}.tk": o.state_dict() for i, o in enumerate(acc._custom_objects)})
        files.update({_loader_name(acc, i): _loader_state(d) for i, d in enumerate(acc._dataloaders)})
    finally:
        rng.restore(rng_state)
    files[f"random_states_{acc.process_index}.tk"] = {"step": acc.step, "rng": rng_state}
    for name, obj in files.items():
        try:
            st.write(name, obj, metadata={"format": "pt"} if name.endswith(".safetensors") else None)
        except TypeError as e:
            raise TypeError(
                f"save_state: {name} cannot be saved without pickle: {e}. Fix: make that state_dict() return "
                "tensors, NumPy arrays, numbers, strings, None and lists/tuples/dicts of them"
            ) from None


def _loader_state(dl: Any) -> dict[str, Any]:
    """A prepared dataloader's position: its epoch, its seedable sampler, a stateful loader's state."""
    out: dict[str, Any] = {"iteration": int(getattr(dl, "iteration", 0))}
    sampler = get_sampler(dl)
    if isinstance(sampler, SeedableRandomSampler):
        out["sampler"] = {"epoch": sampler.epoch, "initial_seed": sampler.initial_seed}
    if getattr(dl, "use_stateful_dataloader", False):
        out["state"] = dl.state_dict()
    return out


# ---------------------------------------------------------------------------------------------- load


def _read(d: str) -> Intact:
    if not os.path.isdir(d):
        raise ValueError(f"Tried to find {d} but folder does not exist")
    if not os.path.isfile(os.path.join(d, layout.MANIFEST)):
        raise CheckpointNotFoundError(
            f"{d} has no {layout.MANIFEST}: it is not a checkpoint written by tensorkeep.accelerate (a stock "
            "Accelerator.save_state folder, or an unfinished save). Fix: if you trust it, load it once with "
            "Accelerator.load_state(accelerator, path) (stock: it unpickles), then save again through tensorkeep"
        )
    try:
        m, loaded = read_dir(d)
    except (FormatError, OSError) as e:
        raise CheckpointNotFoundError(f"cannot load {d}: {e}") from None
    return Intact(m.step, d, m, loaded)


def _apply(acc: Accelerator, found: Intact, strict: bool) -> None:
    loaded, where = found.loaded, found.path
    models = list(acc._models)
    for hook in acc._load_model_state_pre_hook.values():  # they may load models themselves and pop them
        hook(models, where)
    want = [_name("model", i, ".safetensors") for i in range(len(models))]
    want += [_name("optimizer", i) for i in range(len(acc._optimizers))]
    want += [_name("scheduler", i) for i in range(len(acc._schedulers))]
    want += [_loader_name(acc, i) for i in range(len(acc._dataloaders))]
    want += [f"random_states_{acc.process_index}.tk"] + (["scaler.tk"] if acc.scaler is not None else [])
    customs = sorted(n for n in loaded if n.startswith("custom_checkpoint_"))
    missing = [n for n in want if n not in loaded]
    if missing or len(customs) != len(acc._custom_objects):
        raise MismatchError(
            f"{where} does not fit this Accelerator: it lacks {missing} and holds {len(customs)} custom "
            f"checkpoint(s) for {len(acc._custom_objects)} registered object(s). Fix: prepare and register the "
            "same objects, in the same order, as the run that saved it"
        )
    for i, model in enumerate(models):
        model.load_state_dict(loaded[_name("model", i, ".safetensors")], strict=strict)
    if acc.scaler is not None:
        acc.scaler.load_state_dict(loaded["scaler.tk"])
    _each(acc._optimizers, "optimizer", loaded, lambda o, sd: o.load_state_dict(sd))
    _each(acc._schedulers, "scheduler", loaded, lambda s, sd: s.load_state_dict(sd))
    for i, dl in enumerate(acc._dataloaders):
        _load_loader(dl, loaded[_loader_name(acc, i)])
    for i, obj in enumerate(acc._custom_objects):
        obj.load_state_dict(loaded[f"custom_checkpoint_{i}.tk"])
    states = loaded[f"random_states_{acc.process_index}.tk"]
    acc.step = int(states["step"])
    rng.restore(states["rng"])  # last: nothing above may consume randomness afterwards


def _each(objs: list, base: str, loaded: Mapping[str, Any], load: Callable[[Any, Any], None]) -> None:
    for i, obj in enumerate(objs):
        load(obj, loaded[_name(base, i)])


def _load_loader(dl: Any, saved: Mapping[str, Any]) -> None:
    if hasattr(dl, "iteration"):
        dl.iteration = int(saved["iteration"])
    sampler = get_sampler(dl)
    if "sampler" in saved and isinstance(sampler, SeedableRandomSampler):
        sampler.epoch, sampler.initial_seed = int(saved["sampler"]["epoch"]), int(saved["sampler"]["initial_seed"])
    if "state" in saved and getattr(dl, "use_stateful_dataloader", False):
        dl.load_state_dict(saved["state"])


# ------------------------------------------------------------------------------------------- helpers


def _check(acc: Accelerator) -> None:
    unsupported = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA)
    if acc.distributed_type in unsupported:
        raise NotImplementedError(
            f"tensorkeep.accelerate saves single-process and DDP runs; this Accelerator runs {acc.num_processes} "
            f"process(es) with {acc.distributed_type}. Use Accelerator.save_state for it, or tensorkeep's "
            "CheckpointManager (collective over ranks) for the state"
        )
    if acc.num_processes > 1 and acc.project_configuration.save_on_each_node:
        raise NotImplementedError(
            f"tensorkeep.accelerate: save_on_each_node=True (a file system per node) is not supported: the main "
            f"process commits every checkpoint, which all {acc.num_processes} processes must see. Fix: save to a "
            "shared file system with save_on_each_node=False"
        )
    if acc.device.type not in ("cpu", "cuda") and acc not in _WARNED:
        _WARNED.add(acc)
        warnings.warn(
            f"tensorkeep.accelerate: the RNG states of {acc.device.type} devices are not saved (only Python, "
            "NumPy, torch CPU and CUDA): a resumed run may not be bit-identical",
            stacklevel=3,
        )


def _comm(acc: Accelerator) -> Comm | None:
    """The processes of ``acc`` (its default process group), or None for one process."""
    return Comm() if acc.num_processes > 1 else None


def _manager(acc: Accelerator) -> CheckpointManager:
    """The run ``project_dir/checkpoints`` of an Accelerator with automatic naming (locked while it lives)."""
    run, limit = os.path.join(acc.project_dir, "checkpoints"), acc.project_configuration.total_limit
    held = _RUNS.get(acc)
    if held is not None and held[:2] == (run, limit):
        return held[2]
    if held is not None:
        held[2].close()
    # one process: its writer thread serves protect(..., async_save=True) (stage(defer=True))
    mgr = CheckpointManager(run, naming=NAMING, keep_last=limit, async_save=acc.num_processes == 1)
    _RUNS[acc] = (run, limit, mgr)
    return mgr


def _writer(acc: Accelerator) -> Background:
    """The writer thread of asynchronous saves to explicit directories (automatic naming: the manager's)."""
    bg = _WRITERS.get(acc)
    if bg is None or bg.forked:  # (a forked child: the inherited writer thread is the parent's)
        bg = _WRITERS[acc] = Background(True, "tensorkeep.accelerate save_state(output_dir)")
    return bg
