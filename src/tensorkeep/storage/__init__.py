"""Where bytes live: the one place a URL is told from a path.

A path (or a ``file://`` URL) is a file on this machine (:class:`~tensorkeep.storage.disk.DiskBackend`,
its mutations in :mod:`tensorkeep.storage.local`); any other URL that fsspec understands
(``s3://bucket/run``, ``memory://run``, ``gs://…``) is an object store
(:class:`~tensorkeep.storage.objects.Store`). Both are :class:`~tensorkeep.storage.base.Backend`\\ s:
the layers above ask :func:`resolve` or :func:`backend` and use what they get, by its
capabilities (``local``), never by looking at the string.

>>> b, key = resolve("memory://models/mlp.tk"); b.url, key, b.local
('memory://models', 'mlp.tk', False)
>>> b, key = resolve("/tmp/models/mlp.tk"); b.url, key, b.local
('/tmp/models', 'mlp.tk', True)
"""

from __future__ import annotations

import os
import re

from tensorkeep.storage.base import Backend, Source
from tensorkeep.storage.disk import DiskBackend

__all__ = ["Backend", "Source", "backend", "open_source", "resolve"]

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _local(path: str) -> str | None:
    """The local path ``path`` names (a plain path or a ``file://`` URL), None for object storage."""
    if "://" not in path or _URL_RE.match(path) is None:
        return path
    if path.lower().startswith("file://"):
        return path[len("file://") :]
    return None


def backend(root: str | os.PathLike[str]) -> Backend:
    """The backend rooted at ``root``: a directory, or an object-store prefix (``s3://bucket/run``).

    >>> backend("memory://runs/mlp").url, backend("file:///tmp/runs").url
    ('memory://runs/mlp', '/tmp/runs')
    """
    root = os.fspath(root)
    local = _local(root)
    if local is not None:
        return DiskBackend(local)
    from tensorkeep.storage.objects import Store  # fsspec is an optional extra, imported on first use

    return Store(root)


def resolve(path: str | os.PathLike[str]) -> tuple[Backend, str]:
    """The backend holding the file or object ``path`` (rooted at its parent) and its key there."""
    path = os.fspath(path)
    local = _local(path)
    if local is not None:
        parent, name = os.path.split(os.path.abspath(local))
        return DiskBackend(parent), name
    parent, _, key = path.rstrip("/").rpartition("/")
    if not key or parent.endswith(":/") or parent.endswith(":"):
        raise ValueError(f"{path}: name an object (scheme://bucket/key), not a bucket or a bare scheme")
    return backend(parent), key


def open_source(path: str | os.PathLike[str]) -> Source:
    """``path`` opened for reading, wherever it lives."""
    b, key = resolve(path)
    return b.open(key)


def local_path(path: str | os.PathLike[str]) -> str | None:
    """The file ``path`` names on this machine, or None when it is an object in a store.

    >>> local_path("file:///tmp/run"), local_path("s3://b/run"), local_path("runs/mlp")
    ('/tmp/run', None, 'runs/mlp')
    """
    return _local(os.fspath(path))
