"""Which DCP checkpoint to resume from: :func:`latest`, the newest directory of a run that
tensorkeep's DCP ``Writer`` committed and that is intact.

Stock DCP loops resume from the highest ``checkpoint-N``, complete or not. With the ``Writer`` a
directory appears only complete (one rename, after every rank's file is durable), but a complete
one can still be damaged later (a disk error, a bad copy): ``latest`` checks each candidate against
its own table of contents, newest first, and skips a damaged one with a warning.

>>> import torch.distributed.checkpoint as dcp  # doctest: +SKIP
>>> dcp.load(state, checkpoint_id=tk_dcp.latest("dcp-run"), storage_reader=tk_dcp.Reader())  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import warnings

from tensorkeep.distributed.manifest import MANIFEST, read_manifest
from tensorkeep.errors import FormatError
from tensorkeep.file import stored
from tensorkeep.file.reader import open_reader
from tensorkeep.storage import local as _io
from tensorkeep.storage.disk import DiskBackend
from tensorkeep.verification import verify as verify_files

__all__ = ["latest"]

_NUMBER = re.compile(r"(\d+)$")


def _order(parent: str, name: str) -> tuple[int, int, int]:
    """Newest first: a name ending in a number (``checkpoint-12``) by that number, then by mtime."""
    m = _NUMBER.search(name)
    try:
        mtime = os.lstat(os.path.join(parent, name)).st_mtime_ns
    except OSError:
        mtime = 0
    return (1, int(m.group(1)), mtime) if m else (0, 0, mtime)


def _check(path: str, full: bool) -> None:
    """FormatError/OSError unless ``path`` is an intact checkpoint the DCP ``Writer`` wrote."""
    manifest, _ = read_manifest(path)
    if "dcp" not in manifest:
        raise FormatError(f"{path}: written by tk.save_distributed, not by tensorkeep's DCP Writer")
    backend = DiskBackend(path)
    for name, info in manifest["files"].items():
        stored.check(backend, name, info, path)  # there, with the size and header checksum the manifest lists
        open_reader(os.path.join(path, name), cached=False).close()  # and its header intact (its own checksum)
    if full:
        res = verify_files(path)
        if not res.ok:
            raise FormatError("; ".join(str(p) for p in res.problems[:3]))


def latest(parent: str | os.PathLike[str], *, verify: bool = False) -> str | None:
    """The newest checkpoint directory in ``parent`` that tensorkeep's DCP ``Writer`` committed and that
    is intact, or None when there is none (start from scratch).

    Candidates are the subdirectories (not symlinks, not hidden names such as an unfinished save's
    temporary directory) that hold a ``distributed.json`` written by the ``Writer``; the newest is the
    one whose name ends in the highest number (``checkpoint-20`` after ``checkpoint-5``), then the most
    recently changed. Each is checked against its ``distributed.json``: the manifest's own checksum, and
    every file it lists there with its size and an intact header (headers only, not the tensors). ``verify=True``
    also reads every byte and checks every checksum, as ``tensorkeep verify`` does (``dcp.load`` with
    the ``Reader`` checks them too, and raises on a damaged one). A damaged checkpoint is skipped
    with a warning; nothing is deleted.

    >>> latest("/no/such/run") is None
    True
    """
    parent = os.fspath(parent)
    if os.path.isfile(os.path.join(parent, MANIFEST)):
        raise ValueError(
            f"{parent} is a checkpoint, not a run: pass the directory that holds the checkpoints "
            f"(latest({os.path.dirname(os.path.abspath(parent))!r}))"
        )
    try:
        names = [n for n in os.listdir(parent) if not n.startswith(".") and _io.is_real_dir(os.path.join(parent, n))]
    except (FileNotFoundError, NotADirectoryError):
        return None
    for name in sorted(names, key=lambda n: _order(parent, n), reverse=True):
        path = os.path.join(parent, name)
        if not os.path.isfile(os.path.join(path, MANIFEST)):
            continue  # not a tensorkeep checkpoint (a stock DCP directory, logs, configs): not considered
        try:
            _check(path, verify)
        except (FormatError, OSError) as e:
            warnings.warn(f"skipping damaged checkpoint {path}: {e}; trying the previous one", stacklevel=2)
            continue
        return path
    return None
