"""A read-only look at a run directory: every checkpoint, committed, damaged or unfinished."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from tensorkeep.errors import FormatError
from tensorkeep.storage.objects import is_url, local_path
from tensorkeep.checkpoint import layout, packs

_ANY_STEP = re.compile(r"^\.?step_(\d+)")


@dataclass
class CheckpointInfo:
    """One entry of :func:`list_checkpoints`. ``status`` is "ok", "damaged: ..." or "uncommitted".

    ``bytes_held``: what restoring it reads; ``bytes_written``: what saving it wrote (less for an
    incremental checkpoint that reuses tensors of earlier ones)."""

    step: int
    path: str
    status: str
    time: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    bytes_held: int = 0
    bytes_written: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def list_checkpoints(run: "str | os.PathLike[str]", *, verify: bool = False) -> list[CheckpointInfo]:
    """Every checkpoint in ``run``, by step, without taking the run's lock.

    ``verify=True`` also checks every checksum (reads everything); otherwise only the
    manifest and file sizes are checked.

    >>> import tensorkeep as tk
    >>> with tk.CheckpointManager("/tmp/tk-doc-ls") as mgr: _ = mgr.save(1, {"x": 1})
    >>> [(c.step, c.status) for c in tk.list_checkpoints("/tmp/tk-doc-ls")]
    [(1, 'ok')]
    """
    run = os.fspath(run)
    if is_url(run):  # object storage (file:// is a local path)
        if local_path(run) is None:
            from tensorkeep.checkpoint.objects import list_checkpoints as list_remote

            return list_remote(run, verify)
        run = local_path(run) or run
    out = []
    for p in layout.leftovers(run):
        m = _ANY_STEP.match(os.path.basename(p))
        size = _du(p)
        out.append(CheckpointInfo(int(m.group(1)) if m else -1, p, "uncommitted", bytes_held=size, bytes_written=size))
    for s in layout.list_steps(run):
        d = layout.step_dir(run, s)
        size = _du(d)
        info = CheckpointInfo(s, d, "ok", bytes_held=size, bytes_written=size)
        try:
            m = layout.read_manifest(d)
            info.time, info.metrics = m.time, dict(m.metrics)
            if m.parts:
                info.bytes_held, info.bytes_written = m.bytes_held or 0, (m.bytes_written or 0) + size
            layout.check_files(d, m)
            packs.check_packs(run, m.packs, d)
            if verify:
                from tensorkeep.inspection import verify as verify_files

                res = verify_files([os.path.join(d, f) for f in m.files if not f.endswith(".json")]  # tensor files
                                   + [os.path.join(packs.packs_dir(run), p) for p in m.packs])
                if not res.ok:
                    raise FormatError("; ".join(str(p) for p in res.problems))
        except FormatError as e:
            info.status = f"damaged: {e}"
        out.append(info)
    return sorted(out, key=lambda c: (c.step, c.status != "ok"))
