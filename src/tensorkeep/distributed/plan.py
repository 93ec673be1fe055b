"""Plans for distributed saves and loads, as pure data: no torch.distributed, no files.

A tensor of the saved state has a global shape; each rank holds one *box* of it
(offsets and sizes per dimension): the whole tensor for a plain (replicated) tensor,
its local shard for a ``DTensor``. :func:`plan_save` turns what every rank holds into
who writes what: every distinct box is written by exactly one of the ranks holding it,
spread to balance bytes. :func:`plan_read` turns the stored chunks and the box a rank
needs into copies. Resharding is only these copies, so both are tested on many
"ranks" in one process. The geometry of boxes is :mod:`tensorkeep.core.boxes`; what is
written to disk, :mod:`tensorkeep.distributed.manifest`.

>>> a = Held("w", "F32", (4,), (0,), (4,))          # every rank holds all of "w" (16 bytes)
>>> plan = plan_save([[a], [a]])
>>> [c.rank for c in plan.chunks["w"]]              # written once
[0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tensorkeep.core.boxes import Box, check_cover, intersect, volume
from tensorkeep.core.format import DTYPE_SIZES
from tensorkeep.errors import SaveError


@dataclass(frozen=True)
class Held:
    """The box of tensor ``key`` (global ``shape``, ``dtype`` a safetensors name) one rank holds."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def to_json(self) -> list:
        return [self.key, self.dtype, list(self.shape), list(self.offsets), list(self.sizes)]

    @staticmethod
    def from_json(v: list) -> Held:
        key, dtype, shape, offsets, sizes = v
        return Held(key, dtype, tuple(shape), tuple(offsets), tuple(sizes))


@dataclass(frozen=True)
class Chunk:
    """One stored box of a tensor: written by ``rank`` into that rank's file."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    rank: int


@dataclass(frozen=True)
class SavePlan:
    """For every key: dtype, global shape and its chunks (each written by one rank)."""

    world_size: int
    dtypes: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    chunks: dict[str, list[Chunk]]

    def keys_for(self, rank: int) -> list[str]:
        """The keys whose chunk ``rank`` writes (its own box of each)."""
        return [k for k, cs in self.chunks.items() if any(c.rank == rank for c in cs)]

    def bytes_for(self, rank: int) -> int:
        """The bytes of tensor data ``rank`` writes."""
        return sum(
            volume(c.sizes) * DTYPE_SIZES[self.dtypes[k]] for k, cs in self.chunks.items() for c in cs if c.rank == rank
        )


@dataclass(frozen=True)
class ReadItem:
    """Copy the box (``src``, ``sizes``) of a stored chunk to (``dst``, ``sizes``) of the target."""

    rank: int  # whose file holds the chunk
    src: tuple[int, ...]  # offsets inside the stored chunk
    dst: tuple[int, ...]  # offsets inside the target box
    sizes: tuple[int, ...]


def plan_save(held: Sequence[Sequence[Held]]) -> SavePlan:
    """Who writes what, from what every rank holds (``held[rank]``). Pure and deterministic:
    every rank computes the same plan from the same all-gathered input.

    A box held by several ranks (a plain tensor, a ``Replicate()`` DTensor) is written by one
    of them: single-holder boxes are placed first, then the shared ones, largest first, each
    to the holder with the fewest bytes so far (ties to the lowest rank).
    Raises :class:`SaveError` when the ranks disagree about a tensor.
    """
    world = len(held)
    dtypes: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    holders: dict[str, dict[Box, list[int]]] = {}
    for rank, items in enumerate(held):
        for h in items:
            if h.key not in dtypes:
                dtypes[h.key], shapes[h.key], holders[h.key] = h.dtype, h.shape, {}
            elif (h.dtype, h.shape) != (dtypes[h.key], shapes[h.key]):
                first = min(r for r, its in enumerate(held) if any(x.key == h.key for x in its))
                raise SaveError(
                    f"tensor {h.key!r} is {h.dtype} {list(h.shape)} on rank {rank} but {dtypes[h.key]} "
                    f"{list(shapes[h.key])} on rank {first}. Every rank must pass the same state: a plain "
                    "tensor must be the same on every rank, a DTensor must have the same global shape"
                )
            holders[h.key].setdefault((h.offsets, h.sizes), []).append(rank)
    for rank, items in enumerate(held):
        mine = {h.key for h in items}
        missing = [k for k in dtypes if k not in mine]
        if missing:
            others = [r for r, its in enumerate(held) if any(h.key == missing[0] for h in its)]
            raise SaveError(
                f"rank {rank} has no tensor {missing[0]!r}, which rank {others[0]} has ({len(missing)} keys missing "
                f"on rank {rank}). Every rank must pass a state with the same keys (plain tensors replicated on "
                "every rank, DTensors sharded across them)"
            )
    chunks: dict[str, list[Chunk]] = {}
    load = [0] * world
    work = []
    for key, boxes in holders.items():
        why = check_cover(key, shapes[key], list(boxes), "save_distributed")
        if why:
            raise SaveError(
                f"{why}. Only Shard(dim) and Replicate() placements are supported; "
                "redistribute other DTensors first (x.redistribute(mesh, [Replicate()]))"
            )
        chunks[key] = []
        nonempty = [b for b in boxes if volume(b[1])] or list(boxes)[:1]  # an empty tensor: one empty chunk
        for box in nonempty:
            nbytes = volume(box[1]) * DTYPE_SIZES[dtypes[key]]
            work.append((len(boxes[box]) > 1, -nbytes, key, box, sorted(boxes[box]), nbytes))
    for _, _, key, box, ranks, nbytes in sorted(work):
        rank = min(ranks, key=lambda r: (load[r], r))
        load[rank] += nbytes
        chunks[key].append(Chunk(box[0], box[1], rank))
    for cs in chunks.values():
        cs.sort(key=lambda c: c.offsets)
    return SavePlan(world, dtypes, shapes, {k: chunks[k] for k in dtypes})


def plan_read(chunks: Sequence[Chunk], box: Box) -> list[ReadItem]:
    """The copies that fill ``box`` (a rank's target) from the stored ``chunks``.

    >>> plan_read([Chunk((0,), (4,), 0), Chunk((4,), (4,), 1)], ((2,), (4,)))
    [ReadItem(rank=0, src=(2,), dst=(0,), sizes=(2,)), ReadItem(rank=1, src=(0,), dst=(2,), sizes=(2,))]
    """
    out = []
    for c in chunks:
        common = intersect((c.offsets, c.sizes), box)
        if common is None:
            continue
        lo, sizes = common
        out.append(
            ReadItem(
                c.rank, tuple(x - o for x, o in zip(lo, c.offsets)), tuple(x - o for x, o in zip(lo, box[0])), sizes
            )
        )
    return out
