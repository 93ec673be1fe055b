"""Crash-proof ``checkpoint-N`` directories for the Hugging Face ``Trainer`` (and subclasses such as TRL's).

Two lines on top of a stock training script::

    from tensorkeep.transformers import protect
    trainer = protect(Trainer(model=model, args=args, train_dataset=ds))   # or protect(SFTTrainer(...))
    trainer.train(resume_from_checkpoint=True)                              # unchanged

or, for a class of your own: ``class MyTrainer(CrashProofMixin, SFTTrainer): ...`` (the mixin first).
``protect(trainer, async_save=True)`` (one process): a background thread writes and commits each checkpoint.

What changes in ``args.output_dir``:

- every ``checkpoint-N`` is written by the Trainer's own save chain (subclass extras included) into a
  hidden staging directory, fsynced, listed with sizes and CRC-32s in its ``manifest.json``, and
  published by one rename: it exists complete or not at all. ``save_total_limit`` (which keeps the
  newest and ``best_model_checkpoint``, as stock) deletes old checkpoints only after that.
- no pickle: ``optimizer.tk``, ``scheduler.tk``, ``scaler.tk`` and ``rng_state.tk`` (tensorkeep files)
  replace ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt`` and ``rng_state.pth``; the arguments are
  ``training_args.json`` (``args.to_json_string()``) instead of the pickled ``training_args.bin``.
  ``trainer_state.json`` and ``config.json`` stay JSON, and ``model.safetensors`` stays a safetensors
  file (a tensorkeep file is one, with per-tensor checksums), so ``from_pretrained(checkpoint-N)`` works.
- ``train(resume_from_checkpoint=True)`` resumes from the newest checkpoint that verifies (every file
  checked against its manifest before anything is loaded); a damaged one is skipped with a warning.
  A stock checkpoint (no manifest) is used when it is the newest complete-looking one (migration).

Several processes (DDP, ``torchrun``/``accelerate launch``): a save is a collective of every rank (see
:mod:`tensorkeep.checkpoint.stage`). Rank 0 makes the staging directory, every rank writes into it
what the Trainer has it write (the main process the model, optimizer, scheduler, trainer state; each
process its ``rng_state_{i}.tk``), rank 0 commits once every rank's files are durable, and no rank goes
on training before the commit; a failure on any rank raises :class:`~tensorkeep.SaveError` on every
rank with nothing published. On resume every rank loads the same step (the newest intact on every
rank) and its own ``rng_state_{i}.tk``. The output directory must be one file system that every rank
sees (``save_on_each_node=True`` is refused).

Not covered (the save then fails or keeps the stock files, still inside an atomic directory):
DeepSpeed and sharded-FSDP checkpoints (they write subdirectories, which a staged checkpoint refuses),
XLA/NPU/HPU/MLU/MUSA random states (stock ``rng_state.pth`` kept),
``trainer.save_model()`` outside checkpoints and Ray Tune's checkpoints (stock), and the deletion that
stock ``Trainer`` does itself at the end of training with ``save_total_limit=1`` and a best checkpoint
(``shutil.rmtree``: a kill during it leaves a partly deleted directory, which resume skips as damaged).
"""

from __future__ import annotations

import errno
import functools
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

try:
    import safetensors.torch  # noqa: F401  (used by transformers_files: missing here gives the fix below)
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    from transformers.utils import (
        is_sagemaker_mp_enabled,
        is_torch_hpu_available,
        is_torch_mlu_available,
        is_torch_musa_available,
        is_torch_npu_available,
        is_torch_xla_available,
    )
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError(
        f"tensorkeep.transformers needs transformers ({e}). Fix: pip install 'tensorkeep[transformers]'"
    ) from e

from tensorkeep.checkpoint import rng
from tensorkeep.checkpoint.background import check_mode
from tensorkeep.checkpoint.collective import collectively, gather
from tensorkeep.checkpoint.intact import Intact, latest_intact
from tensorkeep.checkpoint.manager import CheckpointManager
from tensorkeep.checkpoint.policies import Record
from tensorkeep.checkpoint.stage import Stage, read_dir
from tensorkeep.distributed.comm import Comm
from tensorkeep.errors import CheckpointNotFoundError, FormatError, SaveError, TensorkeepError
from tensorkeep.integrations.transformers_files import NAME_RE, STATE, newest_stock, safetensors_into
from tensorkeep.storage import local as _io

__all__ = ["CrashProofMixin", "protect", "NAMING"]

#: How the Trainer names its checkpoint directories (``checkpoint-500``).
NAMING = PREFIX_CHECKPOINT_DIR + "-{step}"
_MODEL = "model.safetensors"

T = TypeVar("T", bound=Trainer)


@dataclass(frozen=True)
class _TotalLimit:
    """``save_total_limit`` as the stock Trainer applies it: keep the newest checkpoint and the best
    one, then the newest others until ``limit`` are kept (a retention policy of the run's manager).

    >>> _TotalLimit(2, lambda: 1).keep([Record(s, {}) for s in (1, 2, 3, 4)])
    {1, 4}
    """

    limit: int
    best: Callable[[], int | None]

    def keep(self, records: Sequence[Record]) -> set[int]:
        steps = sorted(r.step for r in records)
        if not steps:
            return set()
        kept = {steps[-1]}
        best = self.best()
        if best in steps:
            kept.add(best)
        others = [s for s in steps if s not in kept]
        room = max(self.limit - len(kept), 0)
        return kept | set(others[len(others) - room :] if room else [])


if TYPE_CHECKING:  # the mixin is only ever combined with a Trainer: type-check it as one
    _Base = Trainer
else:
    _Base = object


class CrashProofMixin(_Base):
    """Makes a ``transformers.Trainer`` (sub)class write and resume tensorkeep checkpoints (see the module).

    >>> from transformers import Trainer
    >>> class MyTrainer(CrashProofMixin, Trainer):  # the mixin first: it wraps the whole save chain
    ...     pass

    Everything ``_save_checkpoint`` writes (the subclass's own files included) goes into a staging
    directory, because every path of the chain comes from ``_get_output_dir``, which points there
    during a save.
    """

    _tk_stage: Stage | None = None
    _tk_push: bool = False
    _tk_resumed: Intact | None = None
    _tk_managers: dict[str, CheckpointManager] | None = None
    #: ``protect(trainer, async_save=True)``: checkpoints are written and committed by a background thread
    #: (``"lazy"``: it also copies the weights the optimizer steps and its state; the next step waits for that)
    tk_async_save: bool | str = False

    # ------------------------------------------------------------------ save

    def _get_output_dir(self, trial: Any) -> str:
        if self._tk_stage is not None:
            return self._tk_stage.run_path
        self._tk_wait()  # stock lists the run's checkpoints after it (end of training): the save in flight first
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = super()._get_output_dir(trial)
        step = self.state.global_step
        name = NAMING.format(step=step)
        final = os.path.join(run_dir, name)
        there = os.path.lexists(final)
        mgr = self._tk_manager(run_dir)
        self._tk_push = False
        lazy = [self.optimizer] if self.tk_async_save == "lazy" and self.optimizer is not None else []
        with mgr.stage(step, subdir=name, defer=bool(self.tk_async_save), lazy=lazy) as st, safetensors_into(st):
            self._tk_stage = st
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._tk_stage = None
            if os.path.lexists(final) and not there:
                raise SaveError(
                    errno.EEXIST,
                    f"{final} was written in place, outside tensorkeep's staging directory: this version of "
                    "transformers builds checkpoint paths differently from 5.24. Fix: install the version "
                    "pinned by tensorkeep[transformers]",
                )
            self._tk_finish(st, run_dir)
        if self._tk_push or (self.tk_async_save and _on_save_callbacks(self)):
            mgr.wait()  # pushing it, or a callback's on_save (next), may read or write checkpoint-N
        if self._tk_push:  # stock pushes the folder it just wrote: now the committed one
            super()._push_from_checkpoint(final)

    def _tk_finish(self, st: Stage, run_dir: str) -> None:
        """Inside the staged save, after the Trainer's chain: paths that point into staging, the
        arguments as JSON instead of a pickle, and this step's logged metrics for the manifest."""
        state, args = self.state, self.args
        best = state.best_model_checkpoint
        if best is not None and os.path.abspath(best).startswith(st.run_path + os.sep):
            state.best_model_checkpoint = os.path.join(run_dir, os.path.relpath(best, st.run_path))
        if not args.should_save:
            return
        if os.path.exists(os.path.join(st.path, STATE)):  # again, with the committed path of the best one
            state.save_to_json(os.path.join(st.path, STATE))
        if os.path.exists(os.path.join(st.path, "training_args.bin")):
            _io.unlink(os.path.join(st.path, "training_args.bin"))
            with open(os.path.join(st.path, "training_args.json"), "w", encoding="utf-8") as f:
                f.write(args.to_json_string())
        for entry in state.log_history:
            if entry.get("step") == state.global_step:
                st.metrics.update(
                    {k: v for k, v in entry.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
                )

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        st = self._tk_stage
        if st is None or not self._tk_plain():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            optimizer, scheduler = self.optimizer, self.lr_scheduler
            assert optimizer is not None and scheduler is not None  # the Trainer made both before training
            st.write("optimizer.tk", optimizer.state_dict(), key="optimizer")
            st.write("scheduler.tk", scheduler.state_dict(), key="lr_scheduler")
        if _overridden_below(self, "_save_optimizer_and_scheduler"):  # a subclass adds its own files
            super()._save_optimizer_and_scheduler(output_dir)
            if self.args.should_save:  # the base's pickles (the main process's): ours are written
                _unlink(output_dir, "optimizer.pt", "scheduler.pt")

    def _save_scaler(self, output_dir: str) -> None:
        st, scaler = self._tk_stage, getattr(self.accelerator, "scaler", None)
        if st is None or scaler is None or is_torch_xla_available():
            return super()._save_scaler(output_dir)
        if self.args.should_save:
            st.write("scaler.tk", scaler.state_dict(), key="scaler")
        if _overridden_below(self, "_save_scaler"):
            super()._save_scaler(output_dir)
            if self.args.should_save:
                _unlink(output_dir, "scaler.pt")

    def _save_rng_state(self, output_dir: str) -> None:
        st = self._tk_stage
        if st is None or _other_accelerator():
            if st is not None:
                _warn_once(
                    "this machine has an accelerator whose random state tensorkeep does not capture: "
                    "the stock rng_state.pth (a pickle) is kept in the checkpoint"
                )
            return super()._save_rng_state(output_dir)
        st.write(self._tk_rng_name(), rng.capture(), key="rng")
        if _overridden_below(self, "_save_rng_state"):
            super()._save_rng_state(output_dir)
            _unlink(output_dir, self._tk_rng_name().replace(".tk", ".pth"))  # this process's own

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._tk_stage is not None:
            self._tk_push = True  # replayed with the committed folder once it exists
            return
        super()._push_from_checkpoint(checkpoint_folder)

    # ------------------------------------------------------------------ resume

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: Any = None,
        **kwargs: Any,
    ) -> Any:
        """``Trainer.train``; ``resume_from_checkpoint=True`` means the newest checkpoint that verifies.

        A path is verified first (a damaged tensorkeep checkpoint raises
        :class:`~tensorkeep.CheckpointNotFoundError`, never a silent switch to another one).
        """
        try:
            if resume_from_checkpoint is True:
                resume_from_checkpoint = self._tk_newest(str(self.args.output_dir))
            elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
                resume_from_checkpoint = self._tk_verify(os.fspath(resume_from_checkpoint))
            return super().train(
                resume_from_checkpoint=resume_from_checkpoint,
                trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval,
                **kwargs,
            )
        finally:
            self._tk_resumed = None
            for mgr in (self._tk_managers or {}).values():
                mgr.close()  # the run's lock: another Trainer may train in it next
            self._tk_managers = None

    def _tk_newest(self, run_dir: str) -> str:
        comm = self._tk_manager(run_dir).comm  # takes the run's lock, removes the leftovers of crashed saves
        found = latest_intact(run_dir, naming=NAMING, comm=comm)  # the same step on every rank
        stock = gather(comm, newest_stock(run_dir), f"looking for stock checkpoints in {run_dir}")[0]  # rank 0's
        if stock is not None and (found is None or stock[0] > found.step):
            warnings.warn(
                f"resuming from {stock[1]}, a checkpoint written without tensorkeep (no manifest.json): it is not "
                "verified and its .pt files are read by transformers",
                stacklevel=3,
            )
            return str(stock[1])
        if found is None:
            raise ValueError(f"No valid checkpoint found in output directory ({run_dir})")  # stock's message
        self._tk_resumed = found
        return found.path

    def _tk_verify(self, path: str) -> str:
        path = os.path.abspath(path)
        names = os.listdir(path) if os.path.isdir(path) else []
        if "manifest.json" not in names and not any(n.endswith(".tk") for n in names):
            return path  # written without tensorkeep: transformers reads it as it always did

        def read() -> Intact:
            try:
                m, loaded = read_dir(path)
            except (FormatError, OSError) as e:
                raise CheckpointNotFoundError(
                    f"cannot resume from {path}: {e}. Fix: pass resume_from_checkpoint=True (the newest checkpoint "
                    f"that verifies), or another checkpoint; `tensorkeep verify {os.path.dirname(path)}` lists them"
                ) from None
            return Intact(m.step, path, m, loaded)

        comm = Comm() if self.args.world_size > 1 else None  # damaged on any rank: every rank raises
        self._tk_resumed = collectively(comm, read, f"verifying {path}")
        return path

    def _tk_take(self, checkpoint: str | None, name: str) -> Any:
        """A verified file of the tensorkeep checkpoint being resumed, handed over once (so that its
        memory goes when the Trainer has applied it); None if ``checkpoint`` is not one."""
        found = self._tk_resumed
        if checkpoint is None or found is None or os.path.abspath(checkpoint) != found.path:
            return None
        return found.loaded.pop(name, None)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        weights = self._tk_take(resume_from_checkpoint, _MODEL)
        if weights is None or not self._tk_plain():  # sharded weights, adapters: transformers reads them (verified)
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = self.model if model is None else model
        assert target is not None
        self._issue_warnings_after_load(target.load_state_dict(weights, False))  # as stock: strict=False

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        optimizer, scheduler = self._tk_take(checkpoint, "optimizer.tk"), self._tk_take(checkpoint, "scheduler.tk")
        if optimizer is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(optimizer)
        if scheduler is not None and self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(scheduler)
        super()._load_optimizer_and_scheduler(checkpoint)  # subclass extras; else no .pt: a no-op

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = self._tk_take(checkpoint, "scaler.tk")
        if scaler is not None:
            self.accelerator.scaler.load_state_dict(scaler)
        super()._load_scaler(checkpoint)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        states = self._tk_take(checkpoint, self._tk_rng_name())
        if states is not None:
            rng.restore(states)
            return
        super()._load_rng_state(checkpoint)

    # ------------------------------------------------------------------ helpers

    def _tk_manager(self, run_dir: str) -> CheckpointManager:
        """The run's manager (its lock held until ``train`` returns), retention as ``save_total_limit``."""
        if self._tk_managers is None:
            self._tk_managers = {}
        run_dir = os.path.abspath(run_dir)
        if run_dir not in self._tk_managers:
            if self.args.world_size > 1 and self.args.save_on_each_node:
                raise TensorkeepError(
                    f"tensorkeep.transformers: save_on_each_node=True (a file system per node) is not supported: "
                    f"rank 0 commits every checkpoint of {run_dir}, which all {self.args.world_size} processes "
                    "must see. Fix: save to a shared file system with save_on_each_node=False"
                )
            limit = self.args.save_total_limit
            policies = [_TotalLimit(limit, self._tk_best_step)] if limit and limit > 0 else []
            self._tk_managers[run_dir] = CheckpointManager(  # one process: its writer thread serves async_save
                run_dir, naming=NAMING, policies=policies, async_save=self.args.world_size <= 1
            )
        return self._tk_managers[run_dir]

    def _tk_wait(self) -> None:
        """Block until the asynchronous save in flight is committed (its error raises here)."""
        for mgr in (self._tk_managers or {}).values():
            mgr.wait()

    def _load_best_model(self) -> None:
        self._tk_wait()  # the best checkpoint may be the one in flight
        return super()._load_best_model()

    def _tk_best_step(self) -> int | None:
        best = self.state.best_model_checkpoint
        m = NAME_RE.fullmatch(os.path.basename(os.path.normpath(best))) if best else None
        return int(m.group(1)) if m else None

    def _tk_plain(self) -> bool:
        """No DeepSpeed, FSDP, XLA or SageMaker: the branch where stock pickles whole state dicts."""
        return not (
            self.is_deepspeed_enabled or self.is_fsdp_enabled or is_torch_xla_available() or is_sagemaker_mp_enabled()
        )

    def _tk_rng_name(self) -> str:
        args = self.args
        return "rng_state.tk" if args.world_size <= 1 else f"rng_state_{args.process_index}.tk"


def protect(trainer: T, *, async_save: bool | str = False) -> T:
    """Make ``trainer`` (a ``transformers.Trainer``, or a subclass's instance such as TRL's
    ``SFTTrainer``) save crash-proof checkpoints and resume from the newest intact one; returns it.

    Example::

        from tensorkeep.transformers import protect
        trainer = protect(Trainer(model=model, args=args, train_dataset=ds))
        trainer.train(resume_from_checkpoint=True)

    Its class becomes ``CrashProof<Class>`` (``CrashProofMixin`` first, then the original class), so
    ``isinstance(trainer, SFTTrainer)`` still holds.

    ``async_save=True`` (one process): the tensor files are copied into staging buffers reused from
    save to save (host memory the size of a checkpoint); a background thread writes them, commits
    ``checkpoint-N`` and applies ``save_total_limit`` while training goes on. The next save, the
    best-model load, the end of ``train()`` and a callback's ``on_save`` (it may use ``checkpoint-N``)
    wait for it and raise its error. (Subclass: ``tk_async_save = True``.) ``async_save="lazy"``: the
    weights the optimizer steps and its state are copied by that thread too, and the next optimizer
    step waits until it has; the save then blocks training only for the rest.
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(f"protect() takes a transformers.Trainer (or a subclass's instance), not {type(trainer)!r}")
    check_mode(async_save)
    if async_save and trainer.args.world_size > 1:
        n = trainer.args.world_size
        raise ValueError(f"async_save=True runs with one process, not {n}. Fix: protect(trainer) (collective saves)")
    if not isinstance(trainer, CrashProofMixin):
        cls: Any = type(trainer)
        trainer.__class__ = _protected(cls)
    trainer.tk_async_save = async_save  # type: ignore[attr-defined]
    return trainer


@functools.cache
def _protected(cls: Any) -> type:
    return type(f"CrashProof{cls.__name__}", (CrashProofMixin, cls), {"__module__": cls.__module__})


def _on_save_callbacks(trainer: Any) -> bool:
    """Whether a callback of ``trainer`` has its own ``on_save`` (none of transformers' built-in ones do)."""
    return any(type(cb).on_save is not TrainerCallback.on_save for cb in trainer.callback_handler.callbacks)


def _overridden_below(trainer: Any, method: str) -> bool:
    """True when a class between the mixin and ``Trainer`` defines ``method`` (it may add files)."""
    mro = type(trainer).__mro__
    between = mro[mro.index(CrashProofMixin) + 1 : mro.index(Trainer)]
    return any(method in vars(c) for c in between)


def _other_accelerator() -> bool:
    checks = (is_torch_xla_available, is_torch_npu_available, is_torch_hpu_available, is_torch_mlu_available)
    return any(f() for f in (*checks, is_torch_musa_available))


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _unlink(directory: str, *names: str) -> None:
    for n in names:
        p = os.path.join(directory, n)
        if os.path.lexists(p):
            _io.unlink(p)
