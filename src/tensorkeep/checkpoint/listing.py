"""A read-only look at a run: every checkpoint, committed, damaged or unfinished."""

from __future__ import annotations

import os

from tensorkeep.checkpoint.info import CheckpointInfo
from tensorkeep.checkpoint.naming import DEFAULT_NAMING
from tensorkeep.checkpoint.runs import open_run

__all__ = ["CheckpointInfo", "list_checkpoints"]


def list_checkpoints(
    run: str | os.PathLike[str], *, verify: bool = False, naming: str = DEFAULT_NAMING
) -> list[CheckpointInfo]:
    """Every checkpoint in ``run`` (a directory, or a URL such as ``s3://bucket/run``), by step,
    without taking the run's lock. ``naming``: how its checkpoints are named (``"checkpoint-{step}"``
    for a Hugging Face run, see :class:`~tensorkeep.CheckpointManager`).

    ``verify=True`` also checks every checksum (reads everything); otherwise only the
    manifest and file sizes are checked.

    >>> import tensorkeep as tk
    >>> with tk.CheckpointManager("/tmp/tk-doc-ls") as mgr: _ = mgr.save(1, {"x": 1})
    >>> [(c.step, c.status) for c in tk.list_checkpoints("/tmp/tk-doc-ls")]
    [(1, 'ok')]
    """
    return open_run(run, naming).list_checkpoints(verify)
