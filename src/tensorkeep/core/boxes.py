"""Boxes of a tensor: pure geometry, shared by distributed checkpoints and the DCP reader.

A *box* is a block of a tensor: (offsets, sizes), one entry per dimension. A rank holds a
box of each tensor (:func:`shard_box`), a stored chunk is one, and a layout is valid when its
boxes tile the tensor exactly (:func:`check_cover`).

>>> intersect(((0, 0), (4, 4)), ((2, 3), (4, 4)))
((2, 3), (2, 1))
>>> volume((2, 3))
6
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Sequence

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes), one entry per dimension

#: Grid cells (beyond 16 per chunk) that :func:`check_cover` may visit before it refuses a layout.
CELL_BUDGET = 1 << 20


def volume(sizes: Sequence[int]) -> int:
    """The number of elements of a box of ``sizes`` (1 for a 0-d one)."""
    n = 1
    for s in sizes:
        n *= s
    return n


def shard_box(
    shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int] | None, placements: Sequence[int | None]
) -> Box:
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
    if any(hi_ <= lo_ for lo_, hi_ in zip(lo, hi)) or volume(a[1]) == 0 or volume(b[1]) == 0:
        return None
    return lo, tuple(hi_ - lo_ for lo_, hi_ in zip(lo, hi))


def _distinct(values: list[int]) -> list[int]:
    """``values`` sorted, without repeats."""
    values.sort()
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


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
    full = [b for b in boxes if volume(b[1])]
    got, want = sum(volume(b[1]) for b in full), volume(shape)
    # the cuts along each dimension (sorted, not hashed: a file's ints could be made to collide);
    # a chunk covers cells [index of o, index of o + s) there
    cuts = [_distinct([off[k] for off, _ in full] + [off[k] + sz[k] for off, sz in full]) for k in range(len(shape))]
    spans = [[(bisect_left(c, o), bisect_left(c, o + s)) for c, o, s in zip(cuts, off, sz)] for off, sz in full]
    cells = sum(volume([hi - lo for lo, hi in span]) for span in spans)
    if cells > 16 * len(full) + CELL_BUDGET:
        if got != want:
            return f"{where}: the chunks of tensor {key!r} hold {got} of its {want} elements (shape {list(shape)})"
        return (
            f"{where}: tensor {key!r} has {len(full)} chunks that do not form a grid (they span {cells} cells "
            f"of the grid their edges cut, more than {16 * len(full) + CELL_BUDGET} are checked); "
            "tensorkeep reads the chunk layouts that Shard(dim) and Replicate() placements make"
        )
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
