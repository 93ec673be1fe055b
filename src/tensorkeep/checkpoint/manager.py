"""CheckpointManager: never lose a run, resume bit-exactly, roll back to any kept step."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from tensorkeep._version import __version__
from tensorkeep.checkpoint import collective, determinism, layout
from tensorkeep.checkpoint.background import Background, check_mode
from tensorkeep.checkpoint.intact import latest_intact, load_verified
from tensorkeep.checkpoint.naming import DEFAULT_NAMING
from tensorkeep.checkpoint.policies import BestN, EveryNSteps, LatestN, Policy, to_keep
from tensorkeep.checkpoint.records import Records
from tensorkeep.checkpoint.runs import open_run
from tensorkeep.checkpoint.stage import Stage
from tensorkeep.checkpoint.state import Payload, apply, bundle, check_rng, payload
from tensorkeep.distributed.comm import Comm
from tensorkeep.errors import CheckpointNotFoundError, FormatError, StorageError, TensorkeepError


class CheckpointManager:
    """Saves and restores training state in ``directory``, one sub-directory per step.

    >>> import torch, tensorkeep as tk
    >>> net = torch.nn.Linear(2, 2); opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> with tk.CheckpointManager("/tmp/tk-doc-run", keep_last=2) as mgr:
    ...     step = mgr.restore({"model": net, "optimizer": opt}) or 0
    ...     _ = mgr.save(step + 1, {"model": net, "optimizer": opt}, metrics={"loss": 0.5})

    ``directory`` is a path, or a URL of an object store (``s3://bucket/run``, see
    :mod:`tensorkeep.checkpoint.run`). Opening a run takes its lock and removes tensorkeep's own
    leftovers of crashed saves (its temporary names only): anything else in the directory is
    never deleted. ``read_only=True`` takes no lock and changes nothing: restore, list, or plan
    ``prune(..., dry_run=True)``.

    ``naming``: how step directories are named, a format with one ``{step}`` field
    (``"checkpoint-{step}"`` is a Hugging Face ``Trainer``'s, ``"checkpoint_{step}"`` Accelerate's).
    :meth:`stage` lets other code write a checkpoint's files (see :mod:`tensorkeep.checkpoint.stage`).

    ``one_file=True``: each checkpoint holds one data file, ``state.tk`` (its top-level keys are the
    parts: ``tk.load(mgr.path(step) + "/state.tk")["model"]``), beside its manifest, instead of one
    file per part: fewer syscalls per commit, for a small state saved often. One process, not with
    ``incremental``. Restore reads either layout.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_best: tuple | None = None,
        keep_every: int | None = None,
        policies: Sequence[Policy] = (),
        save_interval_steps: int | None = None,
        save_interval_seconds: float | None = None,
        durable: bool = True,
        async_save: bool | str = False,
        incremental: bool = False,
        read_only: bool = False,
        naming: str = DEFAULT_NAMING,
        one_file: bool = False,
    ) -> None:
        check_mode(async_save)
        if one_file and incremental:
            raise ValueError("one_file=True and incremental=True exclude each other (incremental writes packs)")
        if incremental and naming != DEFAULT_NAMING:
            raise ValueError(f"incremental=True keeps the default naming {DEFAULT_NAMING!r}, got {naming!r}")
        self._pid = os.getpid()  # the process it belongs to: a forked child gets an error, not a hang
        self._run = open_run(directory, naming)
        self.directory = self._run.url
        self.read_only, self.durable, self.incremental, self.async_save = read_only, durable, incremental, async_save
        self.one_file = one_file
        self.save_interval_steps = save_interval_steps
        self.save_interval_seconds = save_interval_seconds
        self._policies: list[Policy] = list(policies)
        if keep_last is not None:
            self._policies.append(LatestN(keep_last))
        self._best: BestN | None = None
        if keep_best is not None:
            metric, mode, *n = keep_best
            self._best = BestN(metric, mode, n[0] if n else 1)
            self._policies.append(self._best)
        if keep_every is not None:
            self._policies.append(EveryNSteps(keep_every))
        self._closed = False
        self._last_save_time = time.monotonic()
        self._last_saved_step: int | None = None
        self._current_step: int | None = None
        self._preempted: int | None = None
        self._old_handlers: dict[int, Any] = {}
        self._env: dict[str, Any] | None = None
        self._records = Records()
        self._background = Background(async_save, self.directory) if async_save else None
        if read_only:  # no lock, no cleanup: look, restore, plan a prune with dry_run=True
            self._dist = None
            self._read_records()
            return
        self._run.prepare(durable)
        # torch.distributed with 2+ ranks: save/restore are collectives (collective.py); None otherwise
        comm = collective.join(self.directory, async_save=async_save, incremental=incremental, local=self._run.local)
        if comm is not None and one_file:
            raise ValueError(f"one_file=True is for one process; {comm.world} ranks each write their own shard file")
        self._dist = (
            None
            if comm is None
            else collective.Group(comm, self._run, self._records, durable, self._manifest, self._prune)
        )
        if self._dist is not None:  # rank 0 locks and cleans up, every rank reads the records
            collective.open_run(self._dist)
            return
        self._run.lock.acquire()
        self._run.clean()  # unfinished saves of a crashed run, orphan objects and uploads: only its own
        self._read_records()

    def _read_records(self) -> None:
        for s, m in self._run.manifests().items():
            self._records.set(s, m.metrics)

    # ------------------------------------------------------------------ queries

    def steps(self) -> list[int]:
        """Steps of the committed checkpoints, ascending."""
        return self._records.steps()

    def latest_step(self) -> int | None:
        return max(self.steps(), default=None)

    def best_step(self) -> int | None:
        """The best step by the ``keep_best`` metric, or None."""
        if self._best is None:
            return None
        best = self._best.best(self._records.all())
        return best[0].step if best else None

    def metrics(self, step: int) -> dict[str, Any]:
        return self._records.metrics(step)

    @property
    def comm(self) -> Comm | None:
        """The status group of this manager's ranks under torch.distributed (2+ ranks), else None:
        pass it to :func:`~tensorkeep.checkpoint.intact.latest_intact` so every rank picks the same step."""
        return None if self._dist is None else self._dist.comm

    def path(self, step: int) -> str:
        """The directory of a checkpoint (its ``model.tk`` etc. can be read with ``tk.load``, except
        in an incremental run, whose tensors live in shared packs: use :meth:`restore`); on object
        storage the URL of its prefix (object names carry a token: see its manifest.json)."""
        return self._run.step_path(step)

    def should_save(self, step: int) -> bool:
        """True when ``save_interval_steps`` / ``save_interval_seconds`` say a checkpoint is due
        at ``step`` (or a preemption signal arrived, see :meth:`save_on_signal`)."""
        self._current_step = step
        due = (
            self._preempted is not None
            or bool(self.save_interval_steps and step % self.save_interval_steps == 0 and step != self._last_saved_step)
            or (
                self.save_interval_seconds is not None
                and time.monotonic() - self._last_save_time >= self.save_interval_seconds
            )
        )
        if self._dist is not None and (self.save_interval_seconds is not None or self._old_handlers):
            # clocks and signals differ between ranks: they agree here
            due, self._preempted = collective.should_save(self._dist.comm, due, self._preempted)
        return due

    # ------------------------------------------------------------------ save

    def save(self, step: int, state: Mapping[str, Any], *, metrics: Mapping[str, Any] | None = None) -> str:
        """Write a checkpoint of ``state`` at ``step`` and apply retention; returns its directory.

        The checkpoint is written under a temporary name, fsynced, and published by an
        atomic rename: a crash at any moment leaves either the new checkpoint or none.
        """
        self._check_open(writing=True)
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        clean = layout.clean_metrics(metrics, step)  # NumPy/tensor scalars unwrapped; NaN allowed
        self.wait()  # at most one save in flight: memory stays bounded, errors surface here
        self._env = determinism.capture(determinism.devices(state))  # what bit-exact resume depends on
        if self._dist is not None:  # several ranks: a collective, each rank writes its shard
            final = collective.save(self._dist, step, state, clean)
            self._after_commit(step, clean)
        else:
            files, bundled = bundle(payload(state)) if self.one_file else (payload(state), {})
            if self._background is None:
                final = self._commit(step, files, clean, bundled)
            else:
                self._background.submit(
                    step,
                    state,
                    files,
                    self._run.builds_images and not self.incremental,
                    lambda s, p: self._commit(s, p, clean, bundled),
                )
                final = self.path(step)
        if self._preempted is not None:
            self.wait()
            self._exit_after_preemption()
        return final

    @contextmanager
    def stage(
        self,
        step: int,
        *,
        subdir: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        by: str = "tensorkeep",
        defer: bool = False,
        lazy: Sequence[Any] = (),
    ) -> Iterator[Stage]:
        """A checkpoint of ``step`` that any code writes into ``st.path``; published atomically when
        the block ends without an exception, then retention runs (see :mod:`tensorkeep.checkpoint.stage`).

        >>> import torch, tensorkeep as tk
        >>> with tk.CheckpointManager("/tmp/tk-doc-stage-run", naming="checkpoint-{step}") as mgr:
        ...     with mgr.stage(5, metrics={"loss": 0.5}) as st:
        ...         _ = st.write("optimizer.tk", {"lr": 0.1})
        ...         _ = open(os.path.join(st.path, "config.json"), "w").write("{}")
        ...     mgr.path(5).endswith("checkpoint-5"), mgr.metrics(5)
        (True, {'loss': 0.5})

        ``subdir``: for code that appends the checkpoint's name itself: it is given ``st.run_path``
        and writes ``st.run_path/<subdir>`` (``st.path``), which is what gets published.

        With torch.distributed (2+ ranks) it is a collective: every rank enters the block at the same
        step and writes its own files into the same ``st.path``; rank 0 commits once every rank's files
        are durable, every rank returns after that commit, and a failure on any rank raises
        :class:`~tensorkeep.SaveError` on every rank with nothing published.

        ``defer=True`` (a manager with ``async_save``, one process): an asynchronous stage. ``st.write``
        only checks its object; when the block ends, those objects are copied into reused staging
        buffers and the rest (writing them, the commit, retention) runs on the manager's writer thread,
        like an asynchronous :meth:`save`: :meth:`wait` for it. Files other code writes into
        ``st.path`` are written in the block, as without ``defer``. ``lazy`` (with ``defer``): the live
        optimizers (modules may be listed too; they add nothing): the parameters they step and their
        state are copied by the writer thread instead, and every ``optimizer.step()`` waits for that
        copy (``async_save="lazy"``; see :func:`~tensorkeep.checkpoint.background.changed_only_by_optimizers`).
        """
        self._check_open(writing=True)
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if not self._run.local:
            raise TensorkeepError(
                f"{self.directory}: stage() writes a checkpoint directory on a local file system; on object "
                "storage use save()"
            )
        if lazy and not defer:
            raise ValueError(f"{self.directory}: stage(lazy=...) needs defer=True")
        if defer and (self._background is None or self._dist is not None):
            raise ValueError(
                f"{self.directory}: stage(defer=True) needs a CheckpointManager(async_save=True) of one process"
            )
        self.wait()  # at most one save in flight
        self._env = determinism.capture()
        st = Stage(
            self.path(step),
            self._manifest(step, {}),
            durable=self.durable,
            subdir=subdir,
            by=by,
            metrics=metrics,
            comm=self.comm,
            defer=defer,
        )
        with st:
            yield st
        if defer:
            assert self._background is not None
            self._background.later(st, lambda: self._after_commit(step, st.manifest.metrics), lazy)
            return
        self._after_commit(step, st.manifest.metrics)  # rank 0's metrics, on every rank

    def _commit(
        self, step: int, files: Payload, metrics: dict[str, Any], bundled: dict[str, dict[str, str]] | None = None
    ) -> str:
        m = self._manifest(step, metrics)
        m.bundled = dict(bundled or {})
        final = self._run.commit(step, files, m, incremental=self.incremental, durable=self.durable)
        self._after_commit(step, metrics)
        return final

    def _manifest(self, step: int, metrics: dict[str, Any]) -> layout.Manifest:
        return layout.Manifest(
            step,
            layout.now(),
            metrics,
            {},
            {"tensorkeep": __version__, "torch": torch.__version__.split("+")[0]},
            environment=self._env or determinism.capture(),
        )

    def _after_commit(self, step: int, metrics: dict[str, Any]) -> None:
        self._records.set(step, metrics)
        self._last_saved_step = step
        self._last_save_time = time.monotonic()
        if self._dist is not None:  # rank 0 deletes, every rank forgets the same steps
            collective.prune(
                self._dist, None, False, f"checkpoint step {step} was committed, but deleting old checkpoints"
            )
        else:
            self._prune(None, False)  # only now that the new checkpoint is committed

    def prune(self, policies: Sequence[Policy] | None = None, *, dry_run: bool = False) -> list[int]:
        """Apply a retention policy now (the manager's own by default); returns the steps deleted
        (or that would be, with ``dry_run``). The newest checkpoint is always kept; one that holds
        files tensorkeep did not write is kept too, with a warning."""
        self._check_open(writing=not dry_run)
        self.wait()
        if self._dist is not None:  # rank 0 deletes, every rank forgets the same steps
            return collective.prune(self._dist, policies, dry_run)
        return self._prune(policies, dry_run)

    def _prune(self, policies: Sequence[Policy] | None, dry_run: bool) -> list[int]:
        pols = self._policies if policies is None else list(policies)
        if not pols:
            return []
        records = self._records.all()
        doomed = sorted({r.step for r in records} - to_keep(records, pols))
        if dry_run:
            return doomed
        kept = [s for s in doomed if not self._run.remove(s, self.durable)]  # foreign files: kept, with a warning
        for s in doomed:
            if s not in kept:
                self._records.drop(s)
        self._run.collect()  # after the manifests: data a kept checkpoint needs stays
        return [s for s in doomed if s not in kept]

    # ------------------------------------------------------------------ restore

    def restore(self, state: Mapping[str, Any], *, step: int | None = None) -> int | None:
        """Put a checkpoint back into ``state`` (objects' ``load_state_dict``, values, every RNG).

        Without ``step``: the newest intact checkpoint (a damaged newer one is skipped with a
        warning), or None when there is none. With ``step``: that one, or
        :class:`CheckpointNotFoundError` listing the steps that exist.
        """
        self._check_open()
        self.wait()
        if self._dist is not None:  # several ranks: every rank restores the same step, resharded
            found = collective.restore(self._dist, state, step)
        else:
            found = self._restore(state, step)
        if found is not None:
            self._current_step = found
        return found

    def _restore(self, state: Mapping[str, Any], step: int | None) -> int | None:
        if step is None:  # the newest intact one: damaged ones skipped with a warning, and forgotten
            found = latest_intact(self._run, check=check_rng, on_damaged=self._records.drop)
            if found is None:
                return None
        else:
            try:
                found = load_verified(self._run, step, check_rng)  # verified before anything is applied
            except StorageError:
                raise  # the store is unreachable: that says nothing about the checkpoint
            except (FormatError, OSError) as e:
                raise CheckpointNotFoundError(
                    f"cannot restore step {step} from {self.directory}: {e}. Steps that exist: {self.steps()}"
                ) from None
        apply(state, found.manifest, found.loaded)
        return found.step

    # ------------------------------------------------------------------ preemption

    def save_on_signal(self, state: Mapping[str, Any], signals: Iterable[int] = (signal.SIGTERM,)) -> None:
        """On one of ``signals`` (a scheduler's SIGTERM), checkpoint at the next safe point and exit.

        The handler only records the signal: the next :meth:`should_save` returns True, and
        once that :meth:`save` has committed, the process exits with the signal's default action.
        A save in the middle of an optimizer step would capture a half-updated model.
        """
        self._preempt_state = state

        def handler(signum: int, frame: Any) -> None:
            if os.getpid() != self._pid:  # a forked child: the signal is its own, with the action it had before
                old = self._old_handlers.get(signum)
                signal.signal(signum, old if old is not None else signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            self._preempted = signum

        for s in signals:
            self._old_handlers[s] = signal.signal(s, handler)

    @property
    def preempted(self) -> bool:
        """True once a signal registered with :meth:`save_on_signal` arrived."""
        return self._preempted is not None

    def _exit_after_preemption(self) -> None:
        sig = self._preempted
        assert sig is not None
        self.close()
        old = self._old_handlers.get(sig)
        signal.signal(sig, old if callable(old) else signal.SIG_DFL)
        os.kill(os.getpid(), sig)

    # ------------------------------------------------------------------ lifetime

    def wait(self) -> None:
        """Block until the save in flight (``async_save=True``) is committed.

        An error of that background save (disk full, ...) is raised here — or by the next
        ``save()`` or ``close()``, which wait first — and that checkpoint was not published.
        """
        self._check_process()
        if self._background is not None:
            self._background.wait()

    def close(self) -> None:
        """Finish the save in flight, release the run directory's lock (raises a pending save's error)."""
        if self._closed:
            return
        if os.getpid() != self._pid:  # a forked child's copy: the lock and the save in flight are the parent's
            self._closed = True
            return
        try:
            if self._background is not None:
                self._background.close()
        finally:
            self._closed = True
            for s, h in self._old_handlers.items():
                if self._preempted is None:
                    signal.signal(s, h)
            self._run.lock.release()

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise TensorkeepError(
                f"this CheckpointManager for {self.directory} belongs to process {self._pid}, not to this one "
                f"({os.getpid()}), a child forked from it (a DataLoader worker, multiprocessing with fork, os.fork): "
                "the child holds neither the run's lock nor the parent's save in flight. Fix: save and restore in "
                "the parent process only"
            )

    def _check_open(self, writing: bool = False) -> None:
        self._check_process()
        if self._closed:
            raise TensorkeepError(f"this CheckpointManager for {self.directory} is closed")
        if writing and self.read_only:
            raise TensorkeepError(
                f"this CheckpointManager for {self.directory} is read_only: it neither saves nor "
                "deletes. Open another one without read_only=True to write"
            )

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self._run.lock.release()
        except Exception:
            pass
