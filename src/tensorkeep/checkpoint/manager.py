"""CheckpointManager: never lose a run, resume bit-exactly, roll back to any kept step."""

from __future__ import annotations

import atexit
import os
import re
import signal
import sys
import threading
import time
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tensorkeep.storage import local as _io
from tensorkeep.errors import CheckpointNotFoundError, FormatError, TensorkeepError
from tensorkeep.file.reader import load, write
from tensorkeep.file.writer import FileImage, write_image
from tensorkeep.checkpoint import determinism, layout, packs, rng
from tensorkeep.checkpoint import collective
from tensorkeep.storage.objects import StorageError, is_url, local_path
from tensorkeep.checkpoint.lock import RunLock
from tensorkeep.checkpoint.objects import ObjectRun, OwnerRecord
from tensorkeep.checkpoint.policies import BestN, EveryNSteps, LatestN, Policy, Record, to_keep
from tensorkeep.checkpoint.snapshot import Staging, small_image

RNG_FILE = "rng.tk"
VALUES_FILE = "values.tk"
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}$")


def _has_state(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _file_for(key: str, taken: set[str]) -> str:
    base = key if _SAFE_KEY.match(key) and key not in ("rng", "values", "manifest") else "obj"
    name, i = f"{base}.tk", 1
    while name in taken:
        i += 1
        name = f"{base}-{i}.tk"
    return name


class CheckpointManager:
    """Saves and restores training state in ``directory``, one sub-directory per step.

    >>> import torch, tensorkeep as tk
    >>> net = torch.nn.Linear(2, 2); opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> with tk.CheckpointManager("/tmp/tk-doc-run", keep_last=2) as mgr:
    ...     step = mgr.restore({"model": net, "optimizer": opt}) or 0
    ...     _ = mgr.save(step + 1, {"model": net, "optimizer": opt}, metrics={"loss": 0.5})

    Opening a run takes its lock and removes tensorkeep's own leftovers of crashed saves (its
    temporary names only): anything else in the directory is never deleted. ``read_only=True``
    takes no lock and changes nothing: restore, list, or plan ``prune(..., dry_run=True)``.
    """

    def __init__(
        self,
        directory: "str | os.PathLike[str]",
        *,
        keep_last: int | None = None,
        keep_best: tuple | None = None,
        keep_every: int | None = None,
        policies: Sequence[Policy] = (),
        save_interval_steps: int | None = None,
        save_interval_seconds: float | None = None,
        durable: bool = True,
        async_save: "bool | str" = False,
        incremental: bool = False,
        read_only: bool = False,
    ) -> None:
        self._pid = os.getpid()  # the process it belongs to: a forked child gets an error, not a hang
        directory = os.fspath(directory)
        if is_url(directory):  # file:// is a local path; anything else is object storage (objects.py)
            directory = local_path(directory) or directory
        self._remote = ObjectRun(directory) if is_url(directory) else None
        self.directory = self._remote.url if self._remote else os.path.abspath(directory)
        self.read_only = read_only
        if self._remote is None:
            if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
                raise NotADirectoryError(f"CheckpointManager({self.directory!r}): that path is a file, not a run "
                                         "directory. Fix: pass a directory (it is created if missing)")
            if not read_only:
                _io.makedirs(self.directory, durable)
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
        self.save_interval_steps = save_interval_steps
        self.save_interval_seconds = save_interval_seconds
        self.durable = durable
        self.incremental = incremental
        self._lock: RunLock | OwnerRecord = self._remote.owner if self._remote else RunLock(self.directory)
        # torch.distributed with 2+ ranks: save/restore are collectives (collective.py); None otherwise
        self._dist = None if read_only else collective.join(
            self.directory, async_save=async_save, incremental=incremental, remote=self._remote is not None)
        if self._dist is None and not read_only:  # with several ranks, rank 0 takes it in collective.open_run
            self._lock.acquire()
        self._closed = False
        self._last_save_time = time.monotonic()
        self._last_saved_step: int | None = None
        self._current_step: int | None = None
        self._preempted: int | None = None
        self._old_handlers: dict[int, Any] = {}
        self._records: dict[int, Record] = {}
        self._records_lock = threading.Lock()
        if async_save not in (True, False, "lazy"):
            raise ValueError(f"async_save must be True, False or 'lazy', got {async_save!r}")
        self.async_save = async_save
        self._copied = threading.Event()  # async_save="lazy": the deferred copies are done
        self._copied.set()
        self._step_hook: Any = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tk-checkpoint") if async_save else None
        self._pending: tuple[int, Future] | None = None
        self._staging = Staging()
        if async_save:
            atexit.register(_finish_at_exit, weakref.ref(self))
        if read_only:  # no lock, no cleanup: look, restore, plan a prune with dry_run=True
            steps = self._remote.manifests() if self._remote else {
                s: self._read_manifest_or_none(s) for s in layout.list_steps(self.directory)}
            self._records = {s: Record(s, m.metrics) for s, m in steps.items() if m is not None}
            return
        if self._remote is not None:
            for url in self._remote.clean():  # unfinished saves of a crashed run, orphan objects and uploads
                warnings.warn(f"removed the leftovers of an unfinished save: {url}", stacklevel=2)
            self._records = {s: Record(s, m.metrics) for s, m in self._remote.manifests().items()}
            return
        if self._dist is not None:  # rank 0 locks and cleans up, every rank reads the records
            collective.open_run(self)
            return
        layout.clean_run(self.directory)  # unfinished saves and deletions of a crashed run: only its own
        packs.collect(self.directory)  # packs of crashed saves or of an interrupted cleanup
        for s in layout.list_steps(self.directory):
            try:
                self._records[s] = Record(s, layout.read_manifest(layout.step_dir(self.directory, s)).metrics)
            except FormatError:
                pass  # damaged: restore() skips it with a warning

    def _read_manifest_or_none(self, step: int) -> layout.Manifest | None:
        try:
            return layout.read_manifest(layout.step_dir(self.directory, step))
        except FormatError:
            return None  # damaged: restore() skips it with a warning

    # ------------------------------------------------------------------ queries

    def steps(self) -> list[int]:
        """Steps of the committed checkpoints, ascending."""
        with self._records_lock:
            return sorted(self._records)

    def latest_step(self) -> int | None:
        return max(self.steps(), default=None)

    def best_step(self) -> int | None:
        """The best step by the ``keep_best`` metric, or None."""
        if self._best is None:
            return None
        with self._records_lock:
            best = self._best.best(list(self._records.values()))
        return best[0].step if best else None

    def metrics(self, step: int) -> dict[str, Any]:
        return dict(self._records[step].metrics)

    def path(self, step: int) -> str:
        """The directory of a checkpoint (its ``model.tk`` etc. can be read with ``tk.load``, except
        in an incremental run, whose tensors live in shared packs: use :meth:`restore`); on object
        storage the URL of its prefix (object names carry a token: see its manifest.json)."""
        return self._remote.step_url(step) if self._remote else layout.step_dir(self.directory, step)

    def should_save(self, step: int) -> bool:
        """True when ``save_interval_steps`` / ``save_interval_seconds`` say a checkpoint is due
        at ``step`` (or a preemption signal arrived, see :meth:`save_on_signal`)."""
        self._current_step = step
        due = (self._preempted is not None
               or bool(self.save_interval_steps and step % self.save_interval_steps == 0 and step != self._last_saved_step)
               or (self.save_interval_seconds is not None
                   and time.monotonic() - self._last_save_time >= self.save_interval_seconds))
        if self._dist is not None and (self.save_interval_seconds is not None or self._old_handlers):
            due = collective.should_save(self, due)  # clocks and signals differ between ranks: they agree here
        return due

    # ------------------------------------------------------------------ save

    def _payload(self, state: Mapping[str, Any]) -> dict[str, tuple[str, str, Any]]:
        """file name -> (state key, kind, object to save). Live tensors, no copies."""
        if not isinstance(state, Mapping):
            raise TypeError("state must be a dict such as {'model': net, 'optimizer': opt, 'epoch': 3}")
        out: dict[str, tuple[str, str, Any]] = {}
        values: dict[str, Any] = {}
        taken = {RNG_FILE, VALUES_FILE, layout.MANIFEST}
        rng_state = rng.capture()  # first: some state_dict() calls draw random numbers (a StatefulDataLoader
        try:  # without an iterator creates one, drawing a base seed); saving must not move any stream
            for key, obj in state.items():
                if type(key) is not str:
                    raise TypeError(f"state keys must be str, got {key!r}")
                if _has_state(obj):
                    name = _file_for(key, taken)
                    taken.add(name)
                    out[name] = (key, "state_dict", obj.state_dict())
                else:
                    values[key] = obj
        finally:
            rng.restore(rng_state)
        if values:
            out[VALUES_FILE] = ("", "values", values)
        out[RNG_FILE] = ("", "rng", rng_state)
        return out

    def save(self, step: int, state: Mapping[str, Any], *, metrics: Mapping[str, Any] | None = None) -> str:
        """Write a checkpoint of ``state`` at ``step`` and apply retention; returns its directory.

        The checkpoint is written under a temporary name, fsynced, and published by an
        atomic rename: a crash at any moment leaves either the new checkpoint or none.
        """
        self._check_open(writing=True)
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        metrics = layout.clean_metrics(metrics, step)  # NumPy/tensor scalars unwrapped; NaN allowed
        self.wait()  # at most one save in flight: memory stays bounded, errors surface here
        self._env = determinism.capture(determinism.devices(state))  # what bit-exact resume depends on
        if self._dist is not None:  # several ranks: a collective, each rank writes its shard
            final = collective.save(self, step, state, metrics)
        elif not self.async_save:
            final = self._commit(step, self._payload(state), metrics)
            self._after_commit(step, metrics)
        else:
            defer = _changed_only_by_optimizers(state) if self.async_save == "lazy" else frozenset()
            payload = self._payload(state)
            if not self.incremental and self._remote is None:
                # small files are built whole here (a few kB of copies), so the writer thread only
                # makes syscalls: Python work there would take the GIL from training
                payload = {name: (key, kind, small_image(obj, name)) for name, (key, kind, obj) in payload.items()}
            payload = self._staging.snapshot(payload, defer)  # the only part that blocks training
            if defer:  # from here until the writer has copied them, optimizer steps wait
                self._hook_optimizer_steps()
                self._copied.clear()
            fut = self._writer.submit(self._commit_and_retain, step, payload, metrics)  # type: ignore[union-attr]
            self._pending = (step, fut)
            final = self.path(step)
        if self._preempted is not None:
            self.wait()
            self._exit_after_preemption()
        return final

    def _commit_and_retain(self, step: int, payload: dict, metrics: dict[str, Any]) -> None:
        try:
            changed = self._staging.copy_deferred()  # async_save="lazy"
        finally:
            self._copied.set()
            time.sleep(0)  # hand the GIL back now: the training thread may be waiting in optimizer.step()
        if changed:  # paths into the payload: (file, 2, key, ...)
            names = ", ".join(f"{p[0]}: {'.'.join(map(str, p[2:]))}" for p in changed[:3])
            raise TensorkeepError(
                f"checkpoint step {step} was not saved: {names} changed in place while "
                f"async_save='lazy' was still copying it (only optimizer.step() waits for the copy). "
                f"Fix: change parameters only through an optimizer, call mgr.wait() before other in-place "
                f"updates, or use async_save=True. Writes through .data, a NumPy view or untyped_storage() cannot "
                f"be detected at all: make them only after mgr.wait().")
        self._staging.ready()  # device-to-host copies of the snapshot have landed
        self._commit(step, payload, metrics)
        self._after_commit(step, metrics)

    def _commit(self, step: int, payload: dict[str, tuple[str, str, Any]], metrics: dict[str, Any]) -> str:
        """Write everything into a temp directory, fsync, write the manifest last, publish by rename.

        On object storage: upload every object, then the manifest (see objects.py)."""
        if self._remote is not None:
            return self._remote.commit(step, payload, self._manifest(step, metrics), self.incremental)
        tmp = os.path.join(self.directory, f".step_{step:08d}{_io.TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}")
        _io.mkdir(tmp)
        try:
            m = self._manifest(step, metrics)
            if self.incremental:
                known = packs.index(packs.committed(self.directory) or [])
                m.parts, m.packs, m.bytes_written, m.bytes_held = packs.save_parts(
                    self.directory, step, payload, known, self.durable)
            else:
                for name, (key, kind, obj) in payload.items():
                    p = os.path.join(tmp, name)
                    if isinstance(obj, FileImage):
                        size, crc = write_image(obj, p, self.durable, in_place=True)
                    else:
                        size, crc = write(obj, p, {}, self.durable, in_place=True)  # the directory is published by rename
                    m.files[name] = {"size": size, "crc32": crc, "key": key, "kind": kind}
            layout.write_manifest(tmp, m, self.durable)
            if self.durable:
                _io.fsync_dir(tmp)
            final = layout.step_dir(self.directory, step)
            _io.replace_dir(tmp, final, self.durable, layout.replaceable(final))
            return final
        except BaseException as e:
            if os.path.isdir(tmp):
                try:
                    _io.rmtree(tmp)
                except OSError:
                    pass
            if isinstance(e, TensorkeepError) and isinstance(e, OSError):
                raise type(e)(e.errno, f"checkpoint step {step} was not saved: {e} Every committed checkpoint is intact.") from e
            raise

    def _manifest(self, step: int, metrics: dict[str, Any]) -> layout.Manifest:
        from tensorkeep._version import __version__

        return layout.Manifest(step, layout.now(), metrics, {},
                               {"tensorkeep": __version__, "torch": torch.__version__.split("+")[0]},
                               environment=getattr(self, "_env", None) or determinism.capture())

    def _after_commit(self, step: int, metrics: dict[str, Any]) -> None:
        with self._records_lock:
            self._records[step] = Record(step, metrics)
        self._last_saved_step = step
        self._last_save_time = time.monotonic()
        self._prune(None, False)  # only now that the new checkpoint is committed

    def prune(self, policies: Sequence[Policy] | None = None, *, dry_run: bool = False) -> list[int]:
        """Apply a retention policy now (the manager's own by default); returns the steps deleted
        (or that would be, with ``dry_run``). The newest checkpoint is always kept; one that holds
        files tensorkeep did not write is kept too, with a warning."""
        self._check_open(writing=not dry_run)
        self.wait()
        if self._dist is not None:  # rank 0 deletes, every rank forgets the same steps
            return collective.prune(self, policies, dry_run)
        return self._prune(policies, dry_run)

    def _prune(self, policies: Sequence[Policy] | None, dry_run: bool) -> list[int]:
        pols = self._policies if policies is None else list(policies)
        if not pols:
            return []
        with self._records_lock:
            keep = to_keep(list(self._records.values()), pols)
            doomed = sorted(set(self._records) - keep)
        if not dry_run:
            if self._remote is not None and doomed:
                self._remote.owner.check(f"deleting steps {doomed}")
            for s in list(doomed):
                if self._remote is not None:
                    self._remote.remove(s)
                elif not layout.remove_checkpoint(self.directory, s, self.durable):
                    doomed.remove(s)  # holds what tensorkeep did not write: kept, with a warning
                    continue
                with self._records_lock:
                    del self._records[s]
            if self._remote is not None:  # after the manifests: data a kept checkpoint needs stays
                self._remote.collect()
            else:
                packs.collect(self.directory)
        return doomed

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
            return collective.restore(self, state, step)
        steps = self._remote.steps() if self._remote else layout.list_steps(self.directory)
        candidates = [step] if step is not None else sorted(steps, reverse=True)
        skipped: list[int] = []
        for s in candidates:
            d = self.path(s)
            try:
                if self._remote is not None:
                    m = self._remote.read_manifest(s)
                    loaded = self._remote.load(s, m)  # verified before anything is applied
                else:
                    if step is not None and not os.path.isdir(d):
                        raise FormatError(f"{d}: no such checkpoint")
                    m = layout.read_manifest(d)
                    layout.check_files(d, m)
                    if collective.is_distributed(m):  # saved by several ranks: read whole into this process
                        m, loaded = collective.read_whole(d, m)
                    else:
                        loaded = {name: load(os.path.join(d, name)) for name in m.files}  # verified before anything is applied
                    loaded.update(packs.load_parts(self.directory, m.parts, m.packs, d))
                _check_rng(m, loaded, d)  # nothing is applied before everything that can be checked is
            except StorageError:
                raise  # the store is unreachable: that says nothing about the checkpoint, do not skip it
            except (FormatError, OSError) as e:
                if step is not None:
                    raise CheckpointNotFoundError(
                        f"cannot restore step {step} from {self.directory}: {e}. Steps that exist: {self.steps()}"
                    ) from None
                warnings.warn(f"skipping damaged checkpoint {d}: {e}; trying the previous one", stacklevel=2)
                self._records.pop(s, None)
                skipped.append(s)
                continue
            self._apply(state, m, loaded)
            self._current_step = s
            return s
        if skipped:
            warnings.warn(f"{self.directory}: ALL {len(skipped)} checkpoint(s) are damaged (steps {sorted(skipped)}): "
                          "nothing was restored, so restore() returns None and training would start from scratch. "
                          f"Fix: run `tensorkeep verify {self.directory}`, put back a good copy, or pass step= to "
                          "see the error", stacklevel=2)
        return None

    def _apply(self, state: Mapping[str, Any], m: layout.Manifest, loaded: dict[str, Any]) -> None:
        from tensorkeep.model import load_into

        entries = {**m.files, **m.parts}
        by_key = {info["key"]: name for name, info in entries.items() if info.get("kind") == "state_dict"}
        values = next((loaded[n] for n, i in entries.items() if i.get("kind") == "values"), {})
        missing = [k for k, o in state.items() if (k not in by_key if _has_state(o) else k not in values)]
        if missing:
            warnings.warn(f"checkpoint step {m.step} has nothing for {missing}; they keep their current values",
                          stacklevel=3)
        for key, obj in state.items():
            if _has_state(obj) and key in by_key:
                sd = loaded[by_key[key]]
                if isinstance(obj, torch.nn.Module):
                    load_into(obj, sd, strict=True, atomic=False)  # sd is in memory and verified
                else:
                    obj.load_state_dict(sd)
        if isinstance(state, dict):
            for key, v in values.items():
                cur = state.get(key)
                if isinstance(cur, torch.Tensor) and isinstance(v, torch.Tensor) and cur.shape == v.shape and cur.dtype == v.dtype:
                    with torch.no_grad():
                        cur.copy_(v)
                elif key in state:
                    state[key] = v
        diffs = determinism.differences(m.environment, determinism.capture(determinism.devices(state)))
        if diffs:
            warnings.warn(f"checkpoint step {m.step} was saved by a process that computes differently from this one: "
                          f"{'; '.join(diffs)}. The state is restored exactly, but the resumed run may not stay "
                          "bit-identical to an uninterrupted one: run it with the same settings (see "
                          "tensorkeep.checkpoint.determinism.pin)", stacklevel=3)
        rng_state = next((loaded[n] for n, i in entries.items() if i.get("kind") == "rng"), None)
        if rng_state is not None:
            rng.restore(rng_state)  # last: nothing above may consume randomness afterwards

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
        signal.signal(sig, self._old_handlers.get(sig, signal.SIG_DFL) if callable(self._old_handlers.get(sig)) else signal.SIG_DFL)
        os.kill(os.getpid(), sig)

    # ------------------------------------------------------------------ lifetime

    def _hook_optimizer_steps(self) -> None:
        """Make every optimizer.step() wait until a lazy snapshot has copied what it would change."""
        if self._step_hook is None:
            copied, pid = self._copied, self._pid  # not self: the hook must not keep the manager alive

            def wait_for_copy(opt: Any, args: Any, kwargs: Any) -> None:
                if os.getpid() == pid:  # a forked child's copy of the event is never set: nothing to wait for
                    copied.wait()

            self._step_hook = register_optimizer_step_pre_hook(wait_for_copy)

    def wait(self) -> None:
        """Block until the save in flight (``async_save=True``) is committed.

        An error of that background save (disk full, ...) is raised here — or by the next
        ``save()`` or ``close()``, which wait first — and that checkpoint was not published.
        """
        self._check_process()
        if self._pending is None:
            return
        step, fut = self._pending
        try:
            fut.result()
        finally:
            self._pending = None

    def close(self) -> None:
        """Finish the save in flight, release the run directory's lock (raises a pending save's error)."""
        if self._closed:
            return
        if os.getpid() != self._pid:  # a forked child's copy: the lock and the save in flight are the parent's
            self._closed = True
            return
        try:
            self.wait()
        finally:
            self._closed = True
            if self._writer is not None:
                self._writer.shutdown(wait=True)
            if self._step_hook is not None:
                self._step_hook.remove()
            for s, h in self._old_handlers.items():
                if self._preempted is None:
                    signal.signal(s, h)
            self._lock.release()

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise TensorkeepError(
                f"this CheckpointManager for {self.directory} belongs to process {self._pid}, not to this one "
                f"({os.getpid()}), a child forked from it (a DataLoader worker, multiprocessing with fork, os.fork): "
                "the child holds neither the run's lock nor the parent's save in flight. Fix: save and restore in "
                "the parent process only")

    def _check_open(self, writing: bool = False) -> None:
        self._check_process()
        if self._closed:
            raise TensorkeepError(f"this CheckpointManager for {self.directory} is closed")
        if writing and self.read_only:
            raise TensorkeepError(f"this CheckpointManager for {self.directory} is read_only: it neither saves nor "
                                  "deletes. Open another one without read_only=True to write")

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # noqa: D105
        try:
            if not self._closed:
                self._lock.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _check_rng(m: layout.Manifest, loaded: dict[str, Any], where: str) -> None:
    """The checkpoint's RNG states can be set (tried, then undone): a FormatError now, before any
    object is touched, rather than a half-applied restore later."""
    entries = {**m.files, **m.parts}
    saved = [loaded[n] for n, i in entries.items() if i.get("kind") == "rng" and n in loaded]
    if not saved:
        return
    now = rng.capture()
    try:
        rng.restore(saved[0])
    except Exception as e:  # noqa: BLE001 - KeyError, TypeError, ValueError, RuntimeError from torch/NumPy
        raise FormatError(f"{where}: its random number generator states cannot be restored "
                          f"({type(e).__name__}: {e})") from None
    finally:
        rng.restore(now)


def _changed_only_by_optimizers(state: Mapping[str, Any]) -> frozenset[int]:
    """``data_ptr()`` of the CPU tensors in ``state`` that only an optimizer step changes: the
    parameters of its modules and its optimizers' state. Buffers (BatchNorm's running statistics
    change in every forward pass), values and RNG states are copied inside ``save()``."""
    ptrs = set()
    for obj in state.values():
        if isinstance(obj, torch.nn.Module):
            ptrs.update(p.data_ptr() for p in obj.parameters() if p.device.type == "cpu")
        elif isinstance(obj, torch.optim.Optimizer):
            ptrs.update(t.data_ptr() for s in obj.state.values() for t in s.values()
                        if isinstance(t, torch.Tensor) and t.device.type == "cpu")
    return frozenset(ptrs)


def _finish_at_exit(ref: "weakref.ref[CheckpointManager]") -> None:
    """At interpreter exit, finish an asynchronous save still in flight, or say loudly that it failed."""
    mgr = ref()
    if mgr is None or mgr._pending is None or mgr._pid != os.getpid():  # a forked child: the parent's save
        return
    step = mgr._pending[0]
    try:
        mgr.wait()
    except BaseException as e:  # noqa: BLE001 - nobody is left to catch it
        print(f"tensorkeep: the checkpoint of step {step} in {mgr.directory} was NOT saved: {e}", file=sys.stderr)
