"""A run in a directory on this machine (see :mod:`tensorkeep.checkpoint.run`).

A checkpoint is written into a temporary directory, every file and the directory fsynced, the
manifest last, and published by one rename (:mod:`~tensorkeep.checkpoint.layout` says how the
directory looks); incremental checkpoints keep their tensors in shared packs
(:mod:`~tensorkeep.checkpoint.packs`); one writer at a time (:mod:`~tensorkeep.checkpoint.lock`).
"""

from __future__ import annotations

import os
from typing import Any

from tensorkeep.checkpoint import layout, packs
from tensorkeep.checkpoint.info import CheckpointInfo
from tensorkeep.checkpoint.layout import Manifest, Naming
from tensorkeep.checkpoint.lock import RunLock
from tensorkeep.checkpoint.manifest import readable
from tensorkeep.checkpoint.stage import Stage, read_dir
from tensorkeep.errors import FormatError
from tensorkeep.storage import local as _io


class LocalRun:
    """The checkpoints of one run directory."""

    local = True
    builds_images = True  # a small file is built in memory and written with one pwrite

    def __init__(self, directory: str, naming: Naming = layout.DEFAULT) -> None:
        self.url = self.directory = directory
        self.naming = naming  #: how its step directories are named (step_00000100, checkpoint-100, ...)
        self.lock = RunLock(directory)

    def prepare(self, durable: bool) -> None:
        if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
            raise NotADirectoryError(
                f"CheckpointManager({self.directory!r}): that path is a file, not a run "
                "directory. Fix: pass a directory (it is created if missing)"
            )
        _io.makedirs(self.directory, durable)

    def clean(self) -> None:
        layout.clean_run(self.directory, self.naming)  # unfinished saves and deletions of a crashed run: only its own
        packs.collect(self.directory)  # packs of crashed saves or of an interrupted cleanup

    def steps(self) -> list[int]:
        return layout.list_steps(self.directory, self.naming)

    def step_path(self, step: int) -> str:
        return layout.step_dir(self.directory, step, self.naming)

    def read_manifest(self, step: int) -> Manifest:
        d = self.step_path(step)
        if not os.path.isdir(d):
            raise FormatError(f"{d}: no such checkpoint")
        return layout.read_manifest(d)

    def manifests(self) -> dict[int, Manifest]:
        return readable(self.steps(), self.read_manifest)

    def load(self, step: int, m: Manifest) -> tuple[Manifest, dict[str, Any]]:
        d = self.step_path(step)
        m, loaded = read_dir(d, m)  # verified, nothing applied yet
        loaded.update(packs.load_parts(m.parts, packs.locate_local(self.directory, m.packs, d), d))
        return m, loaded

    def commit(
        self, step: int, payload: dict[str, tuple[str, str, Any]], m: Manifest, *, incremental: bool, durable: bool
    ) -> str:
        """Everything into a temporary directory, fsynced, the manifest last, published by rename
        (:class:`~tensorkeep.checkpoint.stage.Stage`: the one commit path of a local checkpoint)."""
        with Stage(self.step_path(step), m, durable=durable, metrics=m.metrics) as st:
            if incremental:  # the tensors go to the run's packs, the manifest names them
                known = packs.index(packs.committed(self.directory) or [])
                m.parts, m.packs, m.bytes_written, m.bytes_held = packs.save_parts(
                    self.directory, step, payload, known, durable
                )
            else:
                for name, (key, kind, obj) in payload.items():
                    st.write(name, obj, key=key, kind=kind)
        return st.final

    def remove(self, step: int, durable: bool) -> bool:
        return layout.remove_checkpoint(self.directory, step, durable, self.naming)

    def collect(self) -> list[str]:
        return packs.collect(self.directory)

    def list_checkpoints(self, verify: bool) -> list[CheckpointInfo]:
        run, out = self.directory, []
        for p in layout.leftovers(run, self.naming):
            base = (_io.temp_of(os.path.basename(p)) or ("",))[0].removesuffix(_io.REPLACED)
            n, size = self.naming.number(base), _du(p)
            out.append(CheckpointInfo(-1 if n is None else n, p, "uncommitted", bytes_held=size, bytes_written=size))
        for s in layout.list_steps(run, self.naming):
            d = layout.step_dir(run, s, self.naming)
            size = _du(d)
            info = CheckpointInfo(s, d, "ok", bytes_held=size, bytes_written=size)
            try:
                man = layout.read_manifest(d)
                info.time, info.metrics = man.time, dict(man.metrics)
                if man.parts:
                    info.bytes_held, info.bytes_written = man.bytes_held or 0, (man.bytes_written or 0) + size
                layout.check_files(d, man)
                packs.check_packs(run, man.packs, d)
                if verify:
                    self.load(s, man)  # every checksum
            except (FormatError, OSError) as e:
                info.status = f"damaged: {e}"
            out.append(info)
        return sorted(out, key=lambda c: (c.step, c.status != "ok"))


def _du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total
