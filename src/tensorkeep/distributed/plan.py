"""Plans for distributed saves and loads, as pure data: no torch.distributed, no files.

A tensor of the saved state has a global shape; each rank holds one *box* of it
(offsets and sizes per dimension): the whole tensor for a plain (replicated) tensor,
its local shard for a ``DTensor``. :func:`plan_save` turns what every rank holds into
who writes what: every distinct box is written by exactly one of the ranks holding it,
spread to balance bytes. :func:`plan_read` turns the stored chunks and the box a rank
needs into copies. Resharding is only these copies, so both are tested on many
"ranks" in one process.

>>> a = Held("w", "F32", (4,), (0,), (4,))          # every rank holds all of "w" (16 bytes)
>>> plan = plan_save([[a], [a]])
>>> [c.rank for c in plan.chunks["w"]]              # written once
[0]
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from dataclasses import dataclass
from typing import Sequence

from tensorkeep.errors import SaveError
from tensorkeep.core.format import DTYPE_SIZES

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes), one entry per dimension


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
    def from_json(v: list) -> "Held":
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
        return sum(_volume(c.sizes) * DTYPE_SIZES[self.dtypes[k]]
                   for k, cs in self.chunks.items() for c in cs if c.rank == rank)


@dataclass(frozen=True)
class ReadItem:
    """Copy the box (``src``, ``sizes``) of a stored chunk to (``dst``, ``sizes``) of the target."""

    rank: int  # whose file holds the chunk
    src: tuple[int, ...]  # offsets inside the stored chunk
    dst: tuple[int, ...]  # offsets inside the target box
    sizes: tuple[int, ...]


def _volume(sizes: Sequence[int]) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def shard_box(shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int] | None,
              placements: Sequence[int | None]) -> Box:
    """The box a rank holds of a tensor laid out on a device mesh.

    ``placements[i]`` is the tensor dimension sharded over mesh dimension ``i`` (``Shard(d)``)
    or None (``Replicate()``). Shards are cut like ``torch.chunk``: ceil-sized pieces, the last
    ones possibly short or empty, which is how ``DTensor`` cuts them. A rank outside the mesh
    (``coordinate`` None) holds an empty box.

    >>> shard_box((7, 4), (4,), (3,), [0])
    ((6, 0), (1, 4))
    >>> shard_box((8, 6), (2, 2), (1, 0), [None, 1])
    ((0, 0), (8, 3))
    """
    offsets, sizes = [0] * len(shape), list(shape)
    if coordinate is None:
        return tuple(offsets), tuple(0 for _ in shape)
    for mesh_dim, dim in enumerate(placements):
        if dim is None:
            continue
        n, size = mesh_shape[mesh_dim], sizes[dim]
        step = -(-size // n)
        start = min(coordinate[mesh_dim] * step, size)
        offsets[dim] += start
        sizes[dim] = min(start + step, size) - start
    return tuple(offsets), tuple(sizes)


def intersect(a: Box, b: Box) -> Box | None:
    """The common box of ``a`` and ``b``, or None when they do not overlap (or one is empty)."""
    lo = tuple(max(x, y) for x, y in zip(a[0], b[0]))
    hi = tuple(min(x + n, y + m) for x, n, y, m in zip(a[0], a[1], b[0], b[1]))
    if any(h <= l for l, h in zip(lo, hi)) or _volume(a[1]) == 0 or _volume(b[1]) == 0:
        return None
    return lo, tuple(h - l for l, h in zip(lo, hi))


def _distinct(values: list[int]) -> list[int]:
    """``values`` sorted, without repeats."""
    values.sort()
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


#: Grid cells (beyond 16 per chunk) that :func:`check_cover` may visit before it refuses a layout.
CELL_BUDGET = 1 << 20


def check_cover(key: str, shape: tuple[int, ...], boxes: Sequence[Box], where: str) -> str | None:
    """Why ``boxes`` do not tile ``shape`` exactly (in bounds, no overlap, nothing missing), or None.

    The chunk edges cut the tensor into a grid; every chunk is a block of its cells, and two
    chunks overlap exactly when they share a cell. Sharding makes one chunk per cell, so this is
    O(n log n); a layout whose chunks span more than 16 cells each plus ``CELL_BUDGET`` is
    refused rather than checked in quadratic time.

    >>> check_cover("w", (4, 4), [((0, 0), (2, 4)), ((2, 0), (2, 4))], "f") is None
    True
    >>> check_cover("w", (4,), [((0,), (3,)), ((2,), (2,))], "f")
    "f: tensor 'w' has overlapping chunks at offsets [0] and [2]"
    """
    for off, sz in boxes:
        if len(off) != len(shape) or len(sz) != len(shape):
            return f"{where}: tensor {key!r} has a chunk with {len(sz)} dimensions, the tensor has {len(shape)}"
        if any(o < 0 or s < 0 or o + s > d for o, s, d in zip(off, sz, shape)):
            return f"{where}: tensor {key!r} has chunk offsets {list(off)} sizes {list(sz)} outside its shape {list(shape)}"
    full = [b for b in boxes if _volume(b[1])]
    got, want = sum(_volume(b[1]) for b in full), _volume(shape)
    # the cuts along each dimension (sorted, not hashed: a file's ints could be made to collide);
    # a chunk covers cells [index of o, index of o + s) there
    cuts = [_distinct([off[k] for off, _ in full] + [off[k] + sz[k] for off, sz in full]) for k in range(len(shape))]
    spans = [[(bisect_left(c, o), bisect_left(c, o + s)) for c, o, s in zip(cuts, off, sz)] for off, sz in full]
    cells = sum(_volume([hi - lo for lo, hi in span]) for span in spans)
    if cells > 16 * len(full) + CELL_BUDGET:
        if got != want:
            return f"{where}: the chunks of tensor {key!r} hold {got} of its {want} elements (shape {list(shape)})"
        return (f"{where}: tensor {key!r} has {len(full)} chunks that do not form a grid (they span {cells} cells "
                f"of the grid their edges cut, more than {16 * len(full) + CELL_BUDGET} are checked); "
                "tensorkeep reads the chunk layouts that Shard(dim) and Replicate() placements make")
    owner: dict[tuple[int, ...], int] = {}
    for i, span in enumerate(spans):
        for cell in itertools.product(*(range(lo, hi) for lo, hi in span)):
            j = owner.setdefault(cell, i)
            if j != i:
                a, b = full[j], full[i]
                return f"{where}: tensor {key!r} has overlapping chunks at offsets {list(a[0])} and {list(b[0])}"
    if got != want:
        return f"{where}: the chunks of tensor {key!r} hold {got} of its {want} elements (shape {list(shape)})"
    return None


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
                    "tensor must be the same on every rank, a DTensor must have the same global shape")
            holders[h.key].setdefault((h.offsets, h.sizes), []).append(rank)
    for rank, items in enumerate(held):
        mine = {h.key for h in items}
        missing = [k for k in dtypes if k not in mine]
        if missing:
            others = [r for r, its in enumerate(held) if any(h.key == missing[0] for h in its)]
            raise SaveError(
                f"rank {rank} has no tensor {missing[0]!r}, which rank {others[0]} has ({len(missing)} keys missing "
                f"on rank {rank}). Every rank must pass a state with the same keys (plain tensors replicated on "
                "every rank, DTensors sharded across them)")
    chunks: dict[str, list[Chunk]] = {}
    load = [0] * world
    work = []
    for key, boxes in holders.items():
        why = check_cover(key, shapes[key], list(boxes), "save_distributed")
        if why:
            raise SaveError(f"{why}. Only Shard(dim) and Replicate() placements are supported; "
                            "redistribute other DTensors first (x.redistribute(mesh, [Replicate()]))")
        chunks[key] = []
        nonempty = [b for b in boxes if _volume(b[1])] or list(boxes)[:1]  # an empty tensor: one empty chunk
        for box in nonempty:
            nbytes = _volume(box[1]) * DTYPE_SIZES[dtypes[key]]
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
        out.append(ReadItem(c.rank, tuple(x - o for x, o in zip(lo, c.offsets)),
                            tuple(x - o for x, o in zip(lo, box[0])), sizes))
    return out
