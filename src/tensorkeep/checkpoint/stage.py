"""Staged checkpoints: let any code write into a checkpoint directory, then publish it atomically.

The one commit path of local checkpoints (``CheckpointManager.save`` uses it too), open to the code
of other libraries, so a trainer's own ``save_*`` functions can write *into* a checkpoint that
appears only when it is complete::

    import tensorkeep as tk

    mgr = tk.CheckpointManager("out", naming="checkpoint-{step}", keep_last=2)
    with mgr.stage(step) as st:                     # st.path: a temporary directory inside "out"
        st.write("optimizer.tk", opt.state_dict())  # a tensorkeep file, recorded in the manifest
        model.save_pretrained(st.path)              # anything other code writes into st.path ...
        st.metrics["loss"] = 0.25
    # ... leaving the block without an exception: every file in st.path that st.write did not write
    # is fsynced and recorded in the manifest as kind "file" (its size and whole-file CRC-32);
    # manifest.json is written last and fsynced, the directory renamed to mgr.path(step) (the run's
    # naming: "out/checkpoint-7"), the run directory fsynced, and only then retention runs.
    # On an exception: nothing is published, the temporary directory is removed, the error propagates.

    with mgr.stage(step, subdir="checkpoint-7") as st:  # for code that appends the name itself:
        hf_save(st.run_path)                         # it writes st.run_path/checkpoint-7 == st.path

    found = intact.latest_intact("out", naming="checkpoint-{step}")  # resume (checkpoint/intact.py)
    if found:                                        # (damaged newer ones skipped with a warning)
        found.step, found.path, found.loaded["optimizer.tk"]  # every tensorkeep file read and verified

Without a manager (no run lock, no retention): ``with stage("ckpt/final", step) as st: ...``.

Under torch.distributed (a manager of 2+ ranks, or ``stage(..., comm=Comm())``) a stage is a
collective: every rank enters and leaves the block at the same point::

    with mgr.stage(step) as st:                      # st.path: rank 0's temporary directory, on every rank
        if rank == 0:
            st.write("optimizer.tk", opt.state_dict())
        st.write(f"rng_state_{rank}.tk", rng.capture())  # each rank its own names (a name is written once)
    # every rank: its files fsynced, their manifest entries all-gathered; rank 0: the other files
    # recorded, the manifest written, the rename; every rank returns only after that commit

An exception on any rank (or a rank that dies) publishes nothing, and every rank raises
:class:`~tensorkeep.SaveError` naming the failing rank. ``latest_intact(..., comm=mgr.comm)`` makes
every rank resume from the same step.

A staged directory holds only files (a subdirectory or a symlink in ``st.path`` fails the save with
:class:`~tensorkeep.SaveError`). Its first file, :data:`~tensorkeep.checkpoint.layout.STAGING_MARKER`,
proves the temporary directory is tensorkeep's: after a crash it is removed whole when the run is
next opened (or by the next ``stage`` of the same final directory). :func:`~tensorkeep.verify`,
``restore`` and :func:`latest_intact` check each kind-"file" entry by reading it whole.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from tensorkeep._version import __version__
from tensorkeep.checkpoint import determinism, layout
from tensorkeep.checkpoint.layout import FILE_KIND, MANIFEST, STAGING_FORMAT, STAGING_MARKER, Manifest
from tensorkeep.checkpoint.steps import is_distributed, read_whole
from tensorkeep.distributed.comm import Comm
from tensorkeep.errors import SaveError, TensorkeepError
from tensorkeep.file.reader import read_file
from tensorkeep.file.writer import FileImage, plan, write, write_image
from tensorkeep.storage import local as _io

__all__ = ["Stage", "stage", "read_dir"]


class Stage:
    """A checkpoint being written into a temporary directory (see the module's docstring).

    ``path``: where its files go; ``run_path``: the temporary directory (``path`` itself, or its
    parent with ``subdir``); ``final``: where it is published; ``metrics``: recorded in its manifest
    (rank 0's, with several ranks). Use it as a context manager (``with Stage(...) as st``), or through
    :meth:`CheckpointManager.stage` or :func:`stage`. ``comm``: the ranks that stage it together (a
    :class:`~tensorkeep.distributed.comm.Comm` of 2+ ranks; None or one rank: this process alone).
    ``clean``: first create the parent of ``final`` and remove leftovers of crashed stages of it.

    ``defer=True`` (one process only) splits the commit for an asynchronous save: :meth:`write`
    checks and records its object without writing it, and leaving the block without an exception
    publishes nothing yet. The owner then snapshots :attr:`deferred` (a :class:`Staging` copy) and
    calls :meth:`finish` with that copy, usually on a background thread: the files are written, the
    others settled, the manifest written and the directory renamed, or, on any error, nothing is
    published and the temporary directory is removed.
    """

    def __init__(
        self,
        final: str,
        manifest: Manifest,
        *,
        durable: bool = True,
        subdir: str | None = None,
        by: str = "tensorkeep",
        metrics: Mapping[str, Any] | None = None,
        comm: Comm | None = None,
        clean: bool = False,
        defer: bool = False,
    ) -> None:
        if defer and comm is not None and comm.world > 1:
            raise ValueError("Stage(defer=True) is for one process; with several ranks a stage is a collective")
        if subdir is not None and not (layout.plain_name(subdir) and not subdir.startswith(".")):
            raise ValueError(f"subdir={subdir!r} must be a plain directory name such as 'checkpoint-7'")
        self.final = os.path.abspath(final)
        self.step = manifest.step
        self.metrics: dict[str, Any] = dict(metrics or {})
        self.durable, self.by, self._subdir, self._m, self._clean = durable, by, subdir, manifest, clean
        self._comm = comm if comm is not None and comm.world > 1 else None
        self.rank = 0 if self._comm is None else self._comm.rank  #: this process's rank (0 alone)
        self.run_path = self.path = ""
        self._files: dict[str, dict[str, Any]] = {}
        self.committed = False
        self.defer = defer
        #: ``defer=True``: what :meth:`write` was given, by file name: ``(obj, key, kind, metadata)``
        self.deferred: dict[str, tuple[Any, str, str, dict[str, str]]] = {}
        self._open_ok = False  # defer=True: the block ended without an exception, finish() may commit

    # ------------------------------------------------------------------ inside the block

    def write(
        self, name: str, obj: Any, *, key: str = "", kind: str = "data", metadata: dict[str, str] | None = None
    ) -> str:
        """Write ``obj`` (tensors, a ``state_dict()``, nested values) as the tensorkeep file ``name``
        in :attr:`path`, fsynced, recorded in the manifest with ``key`` and ``kind``; returns its path.

        ``metadata``: the safetensors header's string metadata (e.g. ``{"format": "pt"}``, which
        ``transformers`` looks for in ``model.safetensors``).
        """
        if not self.path:
            raise TensorkeepError("Stage.write: use the stage in a with block (with mgr.stage(step) as st: ...)")
        if (
            not layout.plain_name(name)
            or name in (MANIFEST, STAGING_MARKER)
            or name in self._files
            or name in self.deferred
        ):
            raise ValueError(
                f"Stage.write: {name!r} is not a free plain file name in checkpoint step {self.step} (no "
                f"separator, not {MANIFEST!r}, not written twice)"
            )
        p = os.path.join(self.path, name)
        if self.defer:  # refused now, on the caller's thread, if it cannot be stored; written by finish()
            if not isinstance(obj, FileImage):
                plan(obj, p, dict(metadata or {}))  # the writer's own checks: structure, dtypes, limits
            self.deferred[name] = (obj, key, kind, dict(metadata or {}))
            return p
        if isinstance(obj, FileImage):
            size, crc = write_image(obj, p, self.durable, in_place=True)
        else:
            size, crc = write(obj, p, dict(metadata or {}), self.durable, in_place=True)
        self._files[name] = {"size": size, "crc32": crc, "key": key, "kind": kind}
        return p

    @property
    def manifest(self) -> Manifest:
        """The manifest this stage publishes (its ``files`` filled in at the commit)."""
        return self._m

    # ------------------------------------------------------------------ open, commit, abort

    def __enter__(self) -> Stage:
        error: BaseException | None = None
        if self.rank == 0:
            try:
                self._open()
            except BaseException as e:
                self._abort()
                if self._comm is None:
                    raise
                error = e
        if self._comm is not None:  # every rank writes into rank 0's directory
            try:
                what = f"checkpoint step {self.step}: making its temporary directory"
                first = self._agree(error, what, {"path": self.path, "run": self.run_path})
            except BaseException:
                self._abort()
                raise
            self.path, self.run_path = first[0]["path"], first[0]["run"]
        return self

    def _open(self) -> None:
        if self._clean:
            _io.makedirs(os.path.dirname(self.final), self.durable)
            _remove_stale(self.final)
        if os.path.lexists(self.final):
            layout.replaceable(self.final)  # refuses (SaveError) before anything is written
        self.run_path = _io.tmp_path(self.final)
        _io.mkdir(self.run_path)
        marker = {"format": STAGING_FORMAT, "by": self.by, "pid": os.getpid(), "host": socket.gethostname()}
        marker.update(time=time.time(), final=os.path.basename(self.final), step=self.step)
        # renamed into place whole: a kill while it is written leaves a temporary name, also removed as ours
        with _io.atomic_file(os.path.join(self.run_path, STAGING_MARKER), durable=False) as fd:
            _io.pwrite_all(fd, memoryview(json.dumps(marker).encode()), 0)
        self.path = self.run_path
        if self._subdir is not None:
            self.path = os.path.join(self.run_path, self._subdir)
            _io.mkdir(self.path)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self._comm is not None:
            self._exit_ranks(exc)
            return
        failed = exc
        if exc is None and self.defer:
            try:  # as they are now, not when the writer thread publishes them
                self.metrics = layout.clean_metrics(self.metrics, self.step)
            except BaseException:
                self._abort()
                raise
            self._open_ok = True  # published by finish(), later
            return
        if exc is None:
            try:
                self._settle()
                self._publish()
                return
            except BaseException as e:
                failed = e
        self._abort()
        if isinstance(failed, TensorkeepError) and isinstance(failed, OSError):
            raise type(failed)(
                failed.errno,
                f"checkpoint step {self.step} was not saved: {failed} Every committed checkpoint is intact.",
            ) from failed
        if failed is not None and failed is not exc:
            raise failed

    def finish(self, objs: Mapping[str, Any]) -> None:
        """``defer=True``, after the block: write ``objs`` (a copy of :attr:`deferred`'s objects, by
        name) and publish, exactly as leaving the block does without ``defer``."""
        if not (self.defer and self._open_ok) or self.committed:
            raise TensorkeepError(
                "Stage.finish: only once, after the with block of a Stage(defer=True) ended without an error"
            )
        self._open_ok = False
        self.defer, todo, self.deferred = False, self.deferred, {}
        try:
            for name, (_, key, kind, meta) in todo.items():
                self.write(name, objs[name], key=key, kind=kind, metadata=meta)
        except BaseException as e:
            self.__exit__(type(e), e, None)
            raise
        self.__exit__(None, None, None)

    def abandon(self) -> None:
        """``defer=True``, after the block, instead of :meth:`finish`: publish nothing, remove the temporary directory."""
        self._open_ok = False
        self._abort()

    def _exit_ranks(self, exc: BaseException | None) -> None:
        """Several ranks: once every rank left its block, the files are settled on every rank (rank 0
        records them), rank 0 publishes, and every rank returns after that (or raises, none published)."""
        what = f"checkpoint step {self.step}"
        try:
            every = self._agree(exc, f"{what}: writing its files", {"files": self._files})
            for s in every:  # st.write creates each file exclusively: two ranks never record one name
                self._files.update(s["files"])
            error: BaseException | None = None
            try:
                self._settle()
            except Exception as e:
                error = e
            self._agree(error, f"{what}: syncing its files")
            text = ""
            if self.rank == 0:
                try:
                    self._publish()
                    text = self._m.to_json()
                except Exception as e:
                    error = e
            done = self._agree(
                error,
                f"{what}: publishing",
                {"manifest": text},
                "Rank 0 could not publish it: the previous checkpoints are intact, and this one is either "
                f"whole or absent ({self.final}).",
            )
        except BaseException:
            self._abort()
            raise
        self.committed = True
        if self.rank != 0:  # rank 0's manifest (its metrics), as published
            self._m = layout.parse_manifest(done[0]["manifest"].encode(), os.path.join(self.final, MANIFEST))
            self.metrics = dict(self._m.metrics)

    def _agree(
        self, error: BaseException | None, what: str, extra: dict | None = None, outcome: str = ""
    ) -> list[dict]:
        """Every rank's outcome (and ``extra``); :class:`SaveError` on every rank if any rank failed (an
        interrupt such as ``KeyboardInterrupt`` is raised as itself on its rank)."""
        assert self._comm is not None
        outcome = outcome or f"Nothing was published: every committed checkpoint beside {self.final} is intact."
        try:
            return self._comm.check(error, what, outcome, extra)
        except SaveError:
            if error is not None and not isinstance(error, Exception):
                raise error from None
            raise

    def _settle(self) -> None:
        """The files other code wrote into :attr:`path`, checked (regular files only) and fsynced; on
        rank 0 (or alone) recorded as kind "file" with their size and whole-file CRC-32."""
        for n in sorted(os.listdir(self.path)):
            if n in self._files or (n == STAGING_MARKER and self.path == self.run_path):
                continue
            p = os.path.join(self.path, n)
            if n == MANIFEST or not layout.plain_name(n) or not _io.is_regular_file(p):
                what = "a file named like tensorkeep's manifest" if n == MANIFEST else "not a plain regular file"
                raise SaveError(
                    errno.EINVAL,
                    f"{p}: {what} (a subdirectory, a symlink?). A staged checkpoint holds only regular "
                    f"files, each recorded in its {MANIFEST}. Fix: write files only, directly into st.path",
                )
            if self.rank == 0:
                size, crc = layout.file_crc(p, self.durable)  # fsynced, then its CRC-32 recorded
                self._files[n] = {"size": size, "crc32": crc, "key": "", "kind": FILE_KIND}
            elif self.durable:  # it may be this rank's: only the writer's fsync counts on some file systems
                fd = _io.open_regular(p)
                try:
                    _io.fsync(fd)
                finally:
                    os.close(fd)
        if self.rank != 0 and self.durable:
            _io.fsync_dir(self.path)

    def _publish(self) -> None:
        """Rank 0 (or alone), every file settled: the manifest last, then the rename that commits."""
        m = self._m
        m.files = dict(self._files)
        m.metrics = layout.clean_metrics(self.metrics, self.step)
        layout.write_manifest(self.path, m, self.durable)  # last: it makes the checkpoint exist
        if self.path == self.run_path:
            _io.unlink(os.path.join(self.path, STAGING_MARKER))  # the manifest now says what is ours
        if self.durable:
            _io.fsync_dir(self.path)
        _io.replace_dir(self.path, self.final, self.durable, layout.replaceable(self.final))
        self.committed = True
        if self.path != self.run_path:
            try:
                _io.rmtree(self.run_path)  # the marker and whatever else was written beside subdir
            except OSError:
                pass  # committed all the same; the leftover goes when the run is next opened

    def _abort(self) -> None:
        """Nothing is published: rank 0 removes the temporary directory (whole when the marker proves it is ours)."""
        if self.rank == 0 and self.run_path and _io.is_real_dir(self.run_path) and not self.committed:
            try:
                layout.remove_leftover(self.run_path)
            except OSError:
                pass  # removed when the run is next opened


def new_manifest(step: int, metrics: Mapping[str, Any] | None = None) -> Manifest:
    """A manifest for ``step`` with this process's versions and environment (files filled in at the commit)."""
    if type(step) is not int or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return Manifest(
        step,
        layout.now(),
        dict(metrics or {}),
        {},
        {"tensorkeep": __version__, "torch": torch.__version__.split("+")[0]},
        environment=determinism.capture(),
    )


def stage(
    final: str | os.PathLike[str],
    step: int,
    *,
    durable: bool = True,
    subdir: str | None = None,
    by: str = "tensorkeep",
    comm: Comm | None = None,
    defer: bool = False,
) -> Stage:
    """A staged checkpoint published as ``final`` (a directory), without a manager: no run lock, no
    retention. An existing ``final`` is replaced atomically only if it is a tensorkeep checkpoint
    holding nothing else. Leftovers of crashed stages of ``final`` (dead processes) are removed first.
    ``comm``: the ranks that stage it together, e.g. ``Comm()`` (the default process group): then every
    rank must enter the block (see the module's docstring).

    >>> import torch
    >>> with stage("/tmp/tk-doc-stage/ckpt", 3) as st:
    ...     _ = st.write("w.tk", {"w": torch.ones(2)})
    ...     _ = open(f"{st.path}/notes.txt", "w").write("hi")
    >>> sorted(os.listdir("/tmp/tk-doc-stage/ckpt"))
    ['manifest.json', 'notes.txt', 'w.tk']
    """
    final = os.path.abspath(os.fspath(final))
    return Stage(final, new_manifest(step), durable=durable, subdir=subdir, by=by, comm=comm, clean=True, defer=defer)


def _remove_stale(final: str) -> None:
    """Temporary directories of ``final`` left by dead processes: removed (or a parked one put back)."""
    d, base = os.path.split(final)
    for n in sorted(os.listdir(d), key=lambda n: _io.REPLACED not in n):
        t, p = _io.temp_of(n), os.path.join(d, n)
        if t is None or t[0] not in (base, base + _io.REPLACED) or not _io.is_stale_temp(n) or not _io.is_real_dir(p):
            continue
        try:
            if t[0] != base and not os.path.lexists(final) and _io.is_regular_file(os.path.join(p, MANIFEST)):
                _io.rename(p, final)  # a replace that died half-way: the committed one goes back
                _io.fsync_dir(d)
            else:
                warnings.warn(f"removing the leftovers of an unfinished save: {p}", stacklevel=5)
                layout.remove_leftover(p)
        except OSError:
            pass


def read_dir(directory: str, m: Manifest | None = None) -> tuple[Manifest, dict[str, Any]]:
    """A checkpoint directory checked against its manifest (``m``, else its ``manifest.json``) and every
    tensorkeep file read and verified, by file name; :class:`FormatError` (or :class:`OSError`) when
    damaged. Files of kind ``"file"`` are checked whole, not loaded; an incremental checkpoint's packs
    are read by its run (``LocalRun.load``).

    >>> import torch
    >>> with stage("/tmp/tk-doc-read-dir", 1) as st: _ = st.write("a.tk", {"t": torch.ones(1)})
    >>> read_dir("/tmp/tk-doc-read-dir")[1]["a.tk"]["t"]
    tensor([1.])
    """
    if m is None:
        m = layout.read_manifest(directory)
    layout.check_files(directory, m)
    if is_distributed(m):  # saved by several ranks: read whole into this process
        return read_whole(directory, m)
    return m, {
        name: read_file(os.path.join(directory, name)) for name, i in m.files.items() if i.get("kind") != FILE_KIND
    }
