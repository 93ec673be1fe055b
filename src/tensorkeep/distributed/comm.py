"""What touches ``torch.distributed``: the collectives of a save (:class:`Comm`: JSON values
all-gathered over the process group, every step's outcome checked on every rank) and the
``DTensor`` helpers (which box of the global tensor a rank holds).

Without an initialized process group, :class:`Comm` is a group of one, so the same code saves
from a single process:

>>> Comm().all_gather({"step": 3})
[{'step': 3}]
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from tensorkeep.core.boxes import Box, shard_box
from tensorkeep.core.format import strict_json
from tensorkeep.distributed.manifest import json_bytes
from tensorkeep.errors import SaveError
from tensorkeep.storage import local as _io


def dtensor_type() -> type[torch.Tensor] | None:
    """``DTensor``, if anything imported it (otherwise no DTensor can exist: no import cost)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def dtensor_box(x: Any, where: str) -> tuple[Box, torch.Tensor]:
    """(the box of the global tensor this rank holds, the local tensor) of a DTensor."""
    from torch.distributed.tensor import Replicate, Shard

    dims: list[int | None] = []
    for p in x.placements:
        if type(p) is Shard:
            dims.append(p.dim)
        elif type(p) is Replicate:
            dims.append(None)
        else:
            raise TypeError(
                f"{where}: DTensor placement {p} is not supported (only Shard(dim) and Replicate()). "
                "Fix: redistribute it first, e.g. x.redistribute(x.device_mesh, [Replicate()] * x.device_mesh.ndim)"
            )
    mesh = x.device_mesh
    box = shard_box(tuple(x.shape), tuple(mesh.shape), mesh.get_coordinate(), dims)
    with torch.no_grad():
        local = x.to_local()
    if tuple(local.shape) != box[1]:
        raise TypeError(
            f"{where}: the local shard is {list(local.shape)}, but placements {list(x.placements)} of "
            f"global shape {list(x.shape)} give {list(box[1])}: uneven custom shardings are not supported"
        )
    return box, local


class Comm:
    """The collectives a save needs, on JSON values. Without an initialized process group,
    a group of one: ``save_distributed`` then works in a single process too."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
            gloo = "gloo" in str(dist.get_backend(group)).lower()
            cuda = not gloo and torch.cuda.is_available()
            self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        elif group is not None:
            raise ValueError("a process group was given, but torch.distributed is not initialized")
        else:
            self.rank, self.world, self.device = 0, 1, torch.device("cpu")

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (JSON through two ``all_gather`` calls)."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        data = torch.frombuffer(bytearray(json_bytes(value)), dtype=torch.uint8)
        n = torch.tensor([data.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.empty_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n, group=self.group)
        lengths = [int(s.item()) for s in sizes]
        buf = torch.zeros(max(lengths), dtype=torch.uint8, device=self.device)
        buf[: data.numel()] = data.to(self.device)
        outs = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(outs, buf, group=self.group)
        return [
            strict_json(bytes(o[:k].cpu().numpy()), f"rank {r}'s status") for r, (o, k) in enumerate(zip(outs, lengths))
        ]

    def check(self, error: BaseException | None, what: str, outcome: str, extra: dict | None = None) -> list[dict]:
        """All-gather every rank's outcome of a step (and ``extra``); raise :class:`SaveError` on
        every rank, naming the failing rank and its error, if any rank failed."""
        mine = {"error": None if error is None else f"{type(error).__name__}: {error}", **(extra or {})}
        try:
            statuses = self.all_gather(mine)
        except Exception as e:
            raise SaveError(
                f"{what}: rank {self.rank} of {self.world} lost contact with the other ranks ({e}). "
                f"Another rank probably died or timed out. {outcome}"
            ) from (error or e)
        failed = [(r, s["error"]) for r, s in enumerate(statuses) if s["error"]]
        if failed:
            r, msg = failed[0]
            more = f" (and on ranks {[f[0] for f in failed[1:]]})" if len(failed) > 1 else ""
            raise SaveError(f"{what} failed on rank {r} of {self.world}{more}: {msg}. {outcome}") from error
        return statuses

    def on_rank0(self, fn: Callable[[], Any], what: str, outcome: str) -> None:
        """Run ``fn`` on rank 0 only (publishing, say); its error is raised on every rank."""
        error = None
        if self.rank == 0:
            try:
                fn()
            except Exception as e:
                error = e
        self.check(error, what, outcome)

    def drop_temp(self, tmp: str) -> None:
        """After a failed save: rank 0 removes the temporary directory, if it made one."""
        if self.rank == 0 and tmp and os.path.isdir(tmp):
            try:
                _io.rmtree(tmp)
            except OSError:
                pass
