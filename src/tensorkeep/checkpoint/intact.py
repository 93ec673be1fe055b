"""Resume from the newest checkpoint that verifies: every file read and checksummed before anything
is applied; a damaged checkpoint is skipped (with a warning) for the one before it; with several
ranks, every rank picks the same step.

>>> import tensorkeep as tk
>>> with tk.CheckpointManager("/tmp/tk-doc-intact-mod") as mgr: _ = mgr.save(2, {"x": 1})
>>> latest_intact("/tmp/tk-doc-intact-mod").step
2
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

from tensorkeep.checkpoint.collective import damaged_anywhere, gather, is_damage
from tensorkeep.checkpoint.layout import Manifest
from tensorkeep.checkpoint.manifest import unbundle
from tensorkeep.checkpoint.naming import DEFAULT_NAMING
from tensorkeep.checkpoint.runs import open_run
from tensorkeep.distributed.comm import Comm

__all__ = ["Intact", "latest_intact", "load_verified"]


class Intact(NamedTuple):
    """A checkpoint that verified: its step, directory, manifest, and every tensorkeep file it holds,
    read and checksummed, by file name (files of kind ``"file"`` were checked whole, not loaded)."""

    step: int
    path: str
    manifest: Manifest
    loaded: dict[str, Any]


Check = Callable[[Manifest, dict[str, Any], str], None]


def load_verified(run: Any, step: int, check: Check | None = None) -> Intact:
    """Checkpoint ``step`` of ``run`` (a :class:`~tensorkeep.checkpoint.run.Run`) read and verified,
    then ``check(manifest, loaded, where)``; :class:`FormatError`/:class:`OSError` when damaged."""
    where = run.step_path(step)
    m, loaded = run.load(step, run.read_manifest(step))
    loaded = unbundle(m, loaded, where)  # a one-file checkpoint's parts, by part name as in any other
    if check is not None:
        check(m, loaded, where)
    return Intact(step, where, m, loaded)


def latest_intact(
    run: Any,
    *,
    naming: str = DEFAULT_NAMING,
    check: Check | None = None,
    on_damaged: Callable[[int], None] | None = None,
    comm: Comm | None = None,
) -> Intact | None:
    """The newest checkpoint of ``run`` that verifies, or None. A damaged newer one is skipped with a
    warning naming the damage (and reported to ``on_damaged``); nothing is changed on disk.

    ``run``: a run directory (read without taking its lock, ``naming`` says how its checkpoints are
    named) or a :class:`~tensorkeep.checkpoint.run.Run`. ``check(manifest, loaded, where)`` may raise
    :class:`FormatError` to reject one more (e.g. RNG states that cannot be set). ``comm`` (2+ ranks):
    a collective; every rank tries rank 0's list of steps, newest first, and every rank returns the
    same step: the newest one that verified on every rank (each rank reads it whole).

    >>> import tensorkeep as tk
    >>> with tk.CheckpointManager("/tmp/tk-doc-intact") as mgr: _ = mgr.save(4, {"x": 1})
    >>> latest_intact("/tmp/tk-doc-intact").step
    4
    """
    if isinstance(run, (str, os.PathLike)):
        run = open_run(run, naming=naming)
    ranks = comm if comm is not None and comm.world > 1 else None
    steps = gather(ranks, sorted(run.steps(), reverse=True), f"listing the checkpoints of {run.url}")[0]
    skipped: list[int] = []
    for s in steps:
        found: Intact | None = None
        bad: BaseException | str | None = None
        try:
            found = load_verified(run, s, check)
        except Exception as e:
            if ranks is None and not is_damage(e):
                raise  # e.g. the store is unreachable: that says nothing about the checkpoint, do not skip it
            bad = e
        if ranks is not None:  # every rank skips it if it is damaged on any rank
            bad = damaged_anywhere(
                ranks, bad if isinstance(bad, BaseException) else None, f"reading {run.step_path(s)}"
            )
        if bad is None:
            return found
        if ranks is None or ranks.rank == 0:
            warnings.warn(
                f"skipping damaged checkpoint {run.step_path(s)}: {bad}; trying the previous one", stacklevel=2
            )
        skipped.append(s)
        if on_damaged is not None:
            on_damaged(s)
    if skipped and (ranks is None or ranks.rank == 0):
        warnings.warn(
            f"{run.url}: ALL {len(skipped)} checkpoint(s) are damaged (steps {sorted(skipped)}): "
            "nothing was restored, so restore() returns None and training would start from scratch. "
            f"Fix: run `tensorkeep verify {run.url}`, put back a good copy, or pass step= to "
            "see the error",
            stacklevel=2,
        )
    return None
