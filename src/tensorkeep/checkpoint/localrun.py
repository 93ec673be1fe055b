"""A run in a directory on this machine (see :mod:`tensorkeep.checkpoint.run`).

A checkpoint is written into a temporary directory, every file and the directory fsynced, the
manifest last, and published by one rename (:mod:`~tensorkeep.checkpoint.layout` says how the
directory looks); incremental checkpoints keep their tensors in shared packs
(:mod:`~tensorkeep.checkpoint.packs`); one writer at a time (:mod:`~tensorkeep.checkpoint.lock`).
"""

from __future__ import annotations

import os
import re
from typing import Any

from tensorkeep.checkpoint import layout, packs
from tensorkeep.checkpoint.info import CheckpointInfo
from tensorkeep.checkpoint.layout import Manifest
from tensorkeep.checkpoint.lock import RunLock
from tensorkeep.checkpoint.steps import is_distributed, read_whole
from tensorkeep.errors import FormatError, TensorkeepError
from tensorkeep.file.reader import read_file
from tensorkeep.file.writer import FileImage, write, write_image
from tensorkeep.storage import local as _io

_ANY_STEP = re.compile(r"^\.?step_(\d+)")


class LocalRun:
    """The checkpoints of one run directory."""

    local = True
    builds_images = True  # a small file is built in memory and written with one pwrite

    def __init__(self, directory: str) -> None:
        self.url = self.directory = directory
        self.lock = RunLock(directory)

    def prepare(self, durable: bool) -> None:
        if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
            raise NotADirectoryError(
                f"CheckpointManager({self.directory!r}): that path is a file, not a run "
                "directory. Fix: pass a directory (it is created if missing)"
            )
        _io.makedirs(self.directory, durable)

    def clean(self) -> None:
        layout.clean_run(self.directory)  # unfinished saves and deletions of a crashed run: only its own
        packs.collect(self.directory)  # packs of crashed saves or of an interrupted cleanup

    def steps(self) -> list[int]:
        return layout.list_steps(self.directory)

    def step_path(self, step: int) -> str:
        return layout.step_dir(self.directory, step)

    def read_manifest(self, step: int) -> Manifest:
        d = self.step_path(step)
        if not os.path.isdir(d):
            raise FormatError(f"{d}: no such checkpoint")
        return layout.read_manifest(d)

    def manifests(self) -> dict[int, Manifest]:
        out = {}
        for s in self.steps():
            try:
                out[s] = self.read_manifest(s)
            except FormatError:
                pass  # damaged: restore() skips it with a warning
        return out

    def load(self, step: int, m: Manifest) -> tuple[Manifest, dict[str, Any]]:
        d = self.step_path(step)
        layout.check_files(d, m)
        if is_distributed(m):  # saved by several ranks: read whole into this process
            m, loaded = read_whole(d, m)
        else:
            loaded = {name: read_file(os.path.join(d, name)) for name in m.files}  # verified, nothing applied yet
        loaded.update(packs.load_parts(m.parts, packs.locate_local(self.directory, m.packs, d), d))
        return m, loaded

    def commit(
        self, step: int, payload: dict[str, tuple[str, str, Any]], m: Manifest, *, incremental: bool, durable: bool
    ) -> str:
        """Everything into a temporary directory, fsynced, the manifest last, published by rename."""
        tmp = os.path.join(self.directory, f".step_{step:08d}{_io.TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}")
        _io.mkdir(tmp)
        try:
            if incremental:
                known = packs.index(packs.committed(self.directory) or [])
                m.parts, m.packs, m.bytes_written, m.bytes_held = packs.save_parts(
                    self.directory, step, payload, known, durable
                )
            else:
                for name, (key, kind, obj) in payload.items():
                    p = os.path.join(tmp, name)
                    if isinstance(obj, FileImage):
                        size, crc = write_image(obj, p, durable, in_place=True)
                    else:
                        size, crc = write(obj, p, {}, durable, in_place=True)  # the directory is published by rename
                    m.files[name] = {"size": size, "crc32": crc, "key": key, "kind": kind}
            layout.write_manifest(tmp, m, durable)
            if durable:
                _io.fsync_dir(tmp)
            final = layout.step_dir(self.directory, step)
            _io.replace_dir(tmp, final, durable, layout.replaceable(final))
            return final
        except BaseException as e:
            if os.path.isdir(tmp):
                try:
                    _io.rmtree(tmp)
                except OSError:
                    pass
            if isinstance(e, TensorkeepError) and isinstance(e, OSError):
                raise type(e)(
                    e.errno, f"checkpoint step {step} was not saved: {e} Every committed checkpoint is intact."
                ) from e
            raise

    def remove(self, step: int, durable: bool) -> bool:
        return layout.remove_checkpoint(self.directory, step, durable)

    def collect(self) -> list[str]:
        return packs.collect(self.directory)

    def list_checkpoints(self, verify: bool) -> list[CheckpointInfo]:
        run, out = self.directory, []
        for p in layout.leftovers(run):
            m = _ANY_STEP.match(os.path.basename(p))
            size = _du(p)
            out.append(
                CheckpointInfo(int(m.group(1)) if m else -1, p, "uncommitted", bytes_held=size, bytes_written=size)
            )
        for s in layout.list_steps(run):
            d = layout.step_dir(run, s)
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
