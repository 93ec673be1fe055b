"""A run: where a :class:`~tensorkeep.CheckpointManager` keeps its checkpoints.

One protocol, two ways to publish a checkpoint, chosen by what the storage backend can do:

- :class:`~tensorkeep.checkpoint.localrun.LocalRun` — a directory on this machine: each step is
  written into a temporary directory, fsynced, and published by one rename (``layout.py``);
  one writer at a time by ``flock`` (``lock.py``).
- :class:`~tensorkeep.checkpoint.objects.ObjectRun` — a prefix of an object store, which has no
  rename: data objects first, under names that carry a token, then the manifest, whose one PUT
  makes the checkpoint exist; the newest manager owns the run (``OwnerRecord``).

The manager talks to either through this protocol only; :func:`~tensorkeep.checkpoint.runs.open_run`
makes the right one for a path or a URL.
"""

from __future__ import annotations

from typing import Any, Protocol

from tensorkeep.checkpoint.info import CheckpointInfo
from tensorkeep.checkpoint.layout import Manifest


class Lock(Protocol):
    """Who writes a run: an ``flock`` (``RunLock``) or the object store's owner record (``OwnerRecord``)."""

    held: bool

    def acquire(self) -> None:
        """Take the run; :class:`~tensorkeep.LockedError` if another manager holds it."""

    def release(self) -> None: ...


class Run(Protocol):
    url: str  #: the directory or URL, as messages name it
    local: bool  #: a directory on this machine (several ranks can share it)
    builds_images: bool  #: small files may be built in memory before the commit (async saves)

    @property
    def lock(self) -> Lock:
        """Who may write the run (read-only here, so each run keeps its own lock type)."""

    def prepare(self, durable: bool) -> None:
        """Make the run exist (a writer calls this before anything else)."""

    def clean(self) -> None:
        """Remove this run's own leftovers of crashed saves (with warnings); nothing else."""

    def steps(self) -> list[int]:
        """Steps that look committed, ascending."""

    def step_path(self, step: int) -> str: ...

    def read_manifest(self, step: int) -> Manifest:
        """The manifest of ``step``; :class:`~tensorkeep.FormatError` if missing or damaged."""

    def manifests(self) -> dict[int, Manifest]:
        """The readable manifests by step (damaged ones left out)."""

    def load(self, step: int, m: Manifest) -> tuple[Manifest, dict[str, Any]]:
        """Every file of a checkpoint, checked against its manifest and verified, by file name."""

    def commit(
        self, step: int, payload: dict[str, tuple[str, str, Any]], m: Manifest, *, incremental: bool, durable: bool
    ) -> str:
        """Write ``payload`` (file name -> (state key, kind, object)) and publish the checkpoint with
        ``m`` (its ``files``/``parts`` filled in here) as its manifest; returns where it is."""

    def remove(self, step: int, durable: bool) -> bool:
        """Delete a checkpoint; False (with a warning) when it holds what tensorkeep did not write."""

    def collect(self) -> list[str]:
        """Delete the packs no committed checkpoint refers to."""

    def list_checkpoints(self, verify: bool) -> list[CheckpointInfo]: ...
