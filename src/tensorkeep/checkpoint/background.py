"""Asynchronous checkpoints: ``save()`` snapshots the state, one background thread writes it.

At most one save is in flight: the next ``save()``, ``wait()`` or ``close()`` waits for it and
raises its error. With ``async_save="lazy"`` the parameters and the optimizer's state are copied by
the writer instead of inside ``save()``, and every ``optimizer.step()`` waits until that copy is
done (a global optimizer step pre-hook).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tensorkeep import threads
from tensorkeep.checkpoint.snapshot import Staging, small_image
from tensorkeep.checkpoint.stage import Stage
from tensorkeep.checkpoint.state import Payload
from tensorkeep.errors import TensorkeepError

MODES = (True, False, "lazy")  #: what ``async_save`` may be


def check_mode(async_save: object) -> None:
    """Refuse an ``async_save`` that is not one of :data:`MODES`.

    >>> check_mode("yes")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ValueError: async_save must be True, False or 'lazy', got 'yes'
    """
    if async_save not in MODES:
        raise ValueError(f"async_save must be True, False or 'lazy', got {async_save!r}")


class Background:
    """The writer thread of one manager (``mode``: True or "lazy"). At interpreter exit a save still in
    flight is finished, or said loudly on stderr to have failed, naming ``where`` it was going."""

    def __init__(self, mode: bool | str, where: str) -> None:
        self.mode, self._pid = mode, os.getpid()
        atexit.register(_finish_at_exit, weakref.ref(self), where)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tk-checkpoint")
        self._pending: tuple[int, Future] | None = None
        self._staging = Staging()
        self._copied = threading.Event()  # async_save="lazy": the deferred copies are done
        self._copied.set()
        self._step_hook: Any = None

    @property
    def forked(self) -> bool:
        """True in a child forked while this writer existed: its thread is the parent's; make a new one."""
        return self._pid != os.getpid()

    @property
    def pending_step(self) -> int | None:
        return self._pending[0] if self._pending else None

    def submit(
        self,
        step: int,
        state: Mapping[str, Any],
        payload: Payload,
        build_images: bool,
        commit: Callable[[int, Payload], object],
    ) -> None:
        """Snapshot ``payload`` (the only part that blocks training) and hand it to the writer, which
        calls ``commit(step, snapshot)``."""
        defer = changed_only_by_optimizers(state) if self.mode == "lazy" else frozenset()
        if build_images:  # small files are built whole here (a few kB of copies), so the writer thread
            # only makes syscalls: Python work there would take the GIL from training
            payload = {name: (key, kind, small_image(obj, name)) for name, (key, kind, obj) in payload.items()}
        self.call(step, payload, lambda snapshot: commit(step, snapshot), defer=defer)

    def _snapshot(self, obj: Any, defer: frozenset[int]) -> Any:
        obj = self._staging.snapshot(obj, defer)
        if defer:  # from here until the writer has copied them, optimizer steps wait
            self._hook_optimizer_steps()
            self._copied.clear()
        return obj

    def call(
        self,
        step: int,
        obj: Any,
        fn: Callable[[Any], object],
        abandon: Callable[[], object] = lambda: None,
        defer: frozenset[int] = frozenset(),
    ) -> None:
        """Snapshot ``obj`` now (the only part that blocks); the writer thread then calls ``fn(snapshot)``.
        ``abandon()`` runs instead of ``fn`` when the snapshot fails. ``defer``: ``data_ptr()`` of CPU
        tensors that only an optimizer step changes (:func:`changed_only_by_optimizers`): the writer
        copies them, and every ``optimizer.step()`` waits until it has.

        >>> bg.call(10, {"w": w}, lambda snap: save(snap, "w.tk"))  # doctest: +SKIP
        """
        try:
            snap = self._snapshot(obj, defer)
            # inline if the pool takes no more work (interpreter exit): the save still finishes
            self._pending = (step, threads.submit(self._writer, self._call, step, snap, fn, abandon))
        except BaseException:
            self._copied.set()
            abandon()
            raise

    def _call(self, step: int, snap: Any, fn: Callable[[Any], object], abandon: Callable[[], object]) -> None:
        try:
            self._copy_deferred(step)
            self._staging.ready()  # device-to-host copies of the snapshot have landed
        except BaseException:
            abandon()
            raise
        fn(snap)

    def later(self, st: Stage, then: Callable[[], object] = lambda: None, lazy: Iterable[Any] = ()) -> None:
        """Finish a deferred stage (``Stage(defer=True)``, its block done) in the background: its objects
        are snapshotted now, written and published by the writer thread, which then calls ``then()``
        (retention). Nothing is published if the snapshot fails. ``lazy``: the live optimizers; the
        parameters they step and their state are copied by the writer instead (see :meth:`call`).

        >>> bg.later(stage, then=apply_retention)  # doctest: +SKIP
        """

        def finish(objs: dict[str, Any]) -> None:
            st.finish(objs)
            then()

        defer = changed_only_by_optimizers({str(i): o for i, o in enumerate(lazy)})
        self.call(st.step, {name: d[0] for name, d in st.deferred.items()}, finish, st.abandon, defer)

    def _copy_deferred(self, step: int) -> None:
        """async_save="lazy": copy what the snapshot deferred; raise if any of it changed meanwhile."""
        try:
            changed = self._staging.copy_deferred()
        finally:
            self._copied.set()
            time.sleep(0)  # hand the GIL back now: the training thread may be waiting in optimizer.step()
        if changed:  # paths into the snapshot: (file, [2,] key, ...)
            names = ", ".join(".".join(map(str, p)) for p in changed[:3])
            raise TensorkeepError(
                f"checkpoint step {step} was not saved: {names} changed in place while "
                f"async_save='lazy' was still copying it (only optimizer.step() waits for the copy). "
                f"Fix: change parameters only through an optimizer, wait for the save (mgr.wait(), or the "
                f"integration's wait) before other in-place updates, or use async_save=True. Writes through "
                f".data, a NumPy view or untyped_storage() cannot be detected at all: make them only after that wait."
            )

    def _hook_optimizer_steps(self) -> None:
        """Make every optimizer.step() wait until a lazy snapshot has copied what it would change."""
        if self._step_hook is None:
            copied, pid = self._copied, self._pid  # not self: the hook must not keep the manager alive

            def wait_for_copy(opt: Any, args: Any, kwargs: Any) -> None:
                if os.getpid() == pid:  # a forked child's copy of the event is never set: nothing to wait for
                    copied.wait()

            self._step_hook = register_optimizer_step_pre_hook(wait_for_copy)

    def wait(self) -> None:
        """Block until the save in flight is committed; raise its error (it was then not published)."""
        if self._pending is None:
            return
        _, fut = self._pending
        try:
            fut.result()
        finally:
            self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._writer.shutdown(wait=True)
            if self._step_hook is not None:
                self._step_hook.remove()


def _finish_at_exit(ref: weakref.ref[Background], where: str) -> None:
    bg = ref()
    if bg is None or bg._pid != os.getpid():  # a forked child: the save in flight is the parent's
        return
    step = bg.pending_step
    if step is None:
        return
    try:
        bg.wait()
    except BaseException as e:
        print(f"tensorkeep: the checkpoint of step {step} in {where} was NOT saved: {e}", file=sys.stderr)


def changed_only_by_optimizers(state: Mapping[str, Any]) -> frozenset[int]:
    """``data_ptr()`` of the CPU tensors in ``state`` that only an optimizer step changes: the
    parameters that its optimizers step (``requires_grad``, in a param group) and their state.
    Everything else is copied inside ``save()``: buffers (BatchNorm's running statistics change in
    every forward pass), frozen parameters, a model no optimizer in ``state`` steps (an EMA copy, a
    target network), values, RNG states. An optimizer that moves parameters outside ``step()`` too
    (schedule-free ``train()``/``eval()``, LOMO's fused backward) defers nothing."""
    ptrs: set[int] = set()
    for opt in state.values():
        if not isinstance(opt, torch.optim.Optimizer) or not _changes_only_in_step(opt):
            continue
        ptrs.update(
            p.data_ptr() for g in opt.param_groups for p in g["params"] if p.requires_grad and p.device.type == "cpu"
        )
        ptrs.update(
            t.data_ptr()
            for s in opt.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor) and t.device.type == "cpu"
        )
    return frozenset(ptrs)


def _changes_only_in_step(opt: torch.optim.Optimizer) -> bool:
    inner = getattr(opt, "optimizer", opt)  # Accelerate's AcceleratedOptimizer wraps the real one
    inner = inner if isinstance(inner, torch.optim.Optimizer) else opt
    schedule_free = callable(getattr(inner, "train", None)) or callable(getattr(inner, "eval", None))
    return not schedule_free and "lomo" not in type(inner).__name__.lower()
