"""Open the run at a path or a URL: a :class:`~tensorkeep.checkpoint.localrun.LocalRun` for a
directory, an :class:`~tensorkeep.checkpoint.objects.ObjectRun` for an object-store prefix (both
follow the :class:`~tensorkeep.checkpoint.run.Run` protocol)."""

from __future__ import annotations

import os

from tensorkeep.checkpoint.localrun import LocalRun
from tensorkeep.checkpoint.naming import DEFAULT_NAMING, Naming
from tensorkeep.checkpoint.objects import ObjectRun
from tensorkeep.checkpoint.run import Run
from tensorkeep.storage import backend
from tensorkeep.storage.objects import Store


def open_run(directory: str | os.PathLike[str], naming: str | Naming = DEFAULT_NAMING) -> Run:
    """The run at ``directory``: a path (or ``file://``) is a directory, an object-store URL a prefix.
    ``naming``: how a directory's checkpoints are named (:class:`~tensorkeep.checkpoint.naming.Naming`).

    >>> open_run("memory://tk-doc-runs/mlp").url, type(open_run("/tmp/tk-doc-runs/mlp")).__name__
    ('memory://tk-doc-runs/mlp', 'LocalRun')
    """
    naming = naming if isinstance(naming, Naming) else Naming(naming)
    b = backend(directory)
    if b.local:
        return LocalRun(b.url, naming)
    if naming != Naming():
        raise ValueError(
            f"{b.url}: naming={naming.fmt!r} is for run directories; a run in an object store names its "
            f"checkpoints {DEFAULT_NAMING!r}. Fix: leave naming at its default"
        )
    assert isinstance(b, Store)  # the only backend that is not local
    return ObjectRun(b)
