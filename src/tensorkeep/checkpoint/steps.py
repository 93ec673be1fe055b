"""Checkpoints saved by several ranks, read in one process (no process group needed).

A step directory written by :mod:`~tensorkeep.checkpoint.collective` holds every rank's shard
(``rank-0000r-of-0000n.tk``), ``distributed.json`` and each rank's RNG states (``rng-0000r.tk``);
its manifest lists them all. :func:`read_whole` reads such a checkpoint whole (resharded to one
process), in the shape a restore applies.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from tensorkeep.checkpoint import layout
from tensorkeep.distributed.load import load_distributed
from tensorkeep.distributed.manifest import MANIFEST as LAYOUT
from tensorkeep.errors import FormatError
from tensorkeep.file.reader import read_file as load

KINDS = ("state_dict", "values")


def rng_file(rank: int) -> str:
    """The file of one rank's RNG states: ``rng-00002.tk``."""
    return f"rng-{rank:05d}.tk"


def is_distributed(m: layout.Manifest) -> bool:
    """Whether a checkpoint was saved by a process group (its shards are read with load_distributed)."""
    return any(info.get("kind") == "distributed" for info in m.files.values())


def layout_entry(d: str, m: layout.Manifest) -> tuple[dict[str, str], int]:
    """(key -> kind, world size) from the manifest's distributed.json entry (untrusted JSON)."""
    info = m.files.get(LAYOUT) or {}
    keys, world = info.get("keys"), info.get("world_size")
    if not isinstance(keys, dict) or any(v not in KINDS for v in keys.values()) or type(world) is not int or world < 1:
        raise FormatError(f"{d}: {layout.MANIFEST} needs the keys and the world size in its {LAYOUT} entry")
    return keys, world


def read_whole(d: str, m: layout.Manifest) -> tuple[layout.Manifest, dict[str, Any]]:
    """One process, no process group: a checkpoint of several ranks read whole (every tensor
    checksummed), as (manifest, loaded) in the shape ``CheckpointManager._apply`` takes.
    The RNG states restored are rank 0's: this process continues as rank 0 did."""
    keys, _ = layout_entry(d, m)
    whole = load_distributed(None, d)
    files: dict[str, dict[str, Any]] = {}
    loaded: dict[str, Any] = {}
    for key, kind in keys.items():
        if kind == "state_dict" and key in whole:
            files[f"state:{key}"] = {"key": key, "kind": "state_dict"}
            loaded[f"state:{key}"] = whole[key]
    files["values"] = {"key": "", "kind": "values"}
    loaded["values"] = {k: whole[k] for k, kind in keys.items() if kind == "values" and k in whole}
    if rng_file(0) in m.files:
        files["rng"] = {"key": "", "kind": "rng"}
        loaded["rng"] = load(os.path.join(d, rng_file(0)))
    return dataclasses.replace(m, files=files, parts={}, packs={}), loaded
