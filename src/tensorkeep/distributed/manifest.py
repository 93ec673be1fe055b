"""``distributed.json``, the manifest of a distributed checkpoint: its names, how it is written,
read and validated, and which files of a checkpoint directory are its own. The one module that
knows this format; the others import its names from here.

    {"crc32": "...", "format": "tensorkeep-distributed", "version": 1, "world_size": 4,
     "files": {"rank-00000-of-00004.tk": {"rank": 0, "size": 5532, "crc32": "14498639"}, ...},
     "tensors": {"rows": {"dtype": "F32", "shape": [10, 6], "chunks": [{"file": "rank-00000-of-00004.tk",
                 "offsets": [0, 0], "sizes": [3, 6]}, ...]}, ...},
     "tree": <tensorkeep tree, tensors as {"t": key}>, "versions": {...}}

A chunk is stored in its file under the tensor's key, with shape ``sizes``.

>>> shard_file(2, 4), is_shard_file("rank-00002-of-00004.tk")
('rank-00002-of-00004.tk', True)
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tensorkeep import knobs
from tensorkeep._version import __version__
from tensorkeep.core.boxes import check_cover
from tensorkeep.core.format import DTYPE_SIZES, seal, strict_json, unseal
from tensorkeep.core.tree import leaf_kinds
from tensorkeep.distributed.plan import Chunk, SavePlan
from tensorkeep.errors import FormatError, SaveError
from tensorkeep.storage import local as _io

MANIFEST = "distributed.json"
FORMAT = "tensorkeep-distributed"
VERSION = 1

_SHARD_RE = re.compile(r"^rank-\d{5,}-of-\d{5,}\.tk$")


def shard_file(rank: int, world: int) -> str:
    """The file a rank writes: ``rank-00002-of-00004.tk``."""
    return f"rank-{rank:05d}-of-{world:05d}.tk"


def is_shard_file(name: str) -> bool:
    """Whether ``name`` is one :func:`shard_file` gives (any rank, any world size)."""
    return _SHARD_RE.match(name) is not None


def sealed_json(value: Any) -> bytes:
    """:func:`json_bytes` with its CRC-32 in front (``format.seal``), so a flipped bit is caught."""
    try:
        return seal(json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False))
    except UnicodeEncodeError:
        return seal(json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False))


def json_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON (strings with lone surrogates, which UTF-8 cannot hold, as escapes).

    >>> json_bytes({"a": [1, "\\udc80"]})
    b'{"a":[1,"\\\\udc80"]}'
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True)
class Stored:
    """One saved tensor: dtype (safetensors name), global shape, chunks (``Chunk.rank``: whose file)."""

    dtype: str
    shape: tuple[int, ...]
    chunks: list[Chunk]


@dataclass(frozen=True)
class Ref:
    """A tensor of the saved structure, not read yet."""

    name: str
    kind: str  # 't' torch, 'n' NumPy
    scalar: bool = False  # a NumPy scalar, stored as a 0-d array

    def __getitem__(self, index: tuple[()]) -> Ref:
        """``ref[()]``: what ``unflatten`` does to a stored NumPy scalar, deferred until it is read."""
        if index != ():
            raise TypeError(f"a Ref is indexed only with (), not {index!r}")
        return Ref(self.name, self.kind, True)


def build_manifest(plan: SavePlan, tree: Any, files: list[dict]) -> dict[str, Any]:
    """The manifest of a save: every file (``files[rank]``: its size and header checksum), every
    tensor's layout (from ``plan``), the structure ``tree``. Written with :func:`sealed_json`."""
    w = plan.world_size
    return {
        "format": FORMAT,
        "version": VERSION,
        "world_size": w,
        "files": {shard_file(r, w): {"rank": r, "size": f["size"], "crc32": f["crc32"]} for r, f in enumerate(files)},
        "tensors": {
            k: {
                "dtype": plan.dtypes[k],
                "shape": list(plan.shapes[k]),
                "chunks": [
                    {"file": shard_file(c.rank, w), "offsets": list(c.offsets), "sizes": list(c.sizes)} for c in cs
                ],
            }
            for k, cs in plan.chunks.items()
        },
        "tree": tree,
        "versions": {"tensorkeep": __version__, "torch": torch.__version__.split("+")[0]},
    }


def assemble_manifest(
    world_size: int,
    files: Mapping[int, Mapping[str, Any]],
    tensors: Mapping[str, Stored],
    tree: Any,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a save planned elsewhere (torch DCP's planner, see
    :mod:`tensorkeep.integrations.dcp`): ``files[rank]`` the size and header checksum of the file
    that rank wrote (a rank that wrote no tensor has none), ``tensors`` each tensor's layout
    (``Chunk.rank``: whose file), ``tree`` the structure, ``extra`` more top-level fields (which
    :func:`read_manifest` passes through). The same format as :func:`build_manifest`.

    >>> m = assemble_manifest(1, {0: {"size": 96, "crc32": "0a1b2c3d"}},
    ...                       {"w": Stored("F32", (2,), [Chunk((0,), (2,), 0)])}, {"d": [["w", {"t": "w"}]]})
    >>> m["files"]
    {'rank-00000-of-00001.tk': {'rank': 0, 'size': 96, 'crc32': '0a1b2c3d'}}
    >>> m["tensors"]["w"]["chunks"]
    [{'file': 'rank-00000-of-00001.tk', 'offsets': [0], 'sizes': [2]}]
    """
    w = world_size
    out: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "world_size": w,
        "files": {
            shard_file(r, w): {"rank": r, "size": f["size"], "crc32": f["crc32"]} for r, f in sorted(files.items())
        },
        "tensors": {
            k: {
                "dtype": s.dtype,
                "shape": list(s.shape),
                "chunks": [
                    {"file": shard_file(c.rank, w), "offsets": list(c.offsets), "sizes": list(c.sizes)}
                    for c in s.chunks
                ],
            }
            for k, s in tensors.items()
        },
        "tree": tree,
        "versions": {"tensorkeep": __version__, "torch": torch.__version__.split("+")[0]},
    }
    for k, v in (extra or {}).items():
        if k in out:
            raise ValueError(f"assemble_manifest: extra field {k!r} would replace the manifest's own")
        out[k] = v
    return out


def _ints(v: Any, n: int | None, what: str) -> tuple[int, ...]:
    if type(v) is not list or any(type(x) is not int or x < 0 for x in v) or (n is not None and len(v) != n):
        raise FormatError(f"{what} must be a list of {n if n is not None else ''} non-negative ints, got {v!r:.80}")
    return tuple(v)


def read_manifest(path: str) -> tuple[dict[str, Any], dict[str, Stored]]:
    """Read and validate ``distributed.json`` of the checkpoint directory ``path``: (the manifest,
    key -> :class:`Stored`). :class:`FormatError` names what is wrong."""
    mpath = os.path.join(path, MANIFEST)
    if os.path.exists(mpath) and not os.path.isfile(mpath):  # a FIFO would block open() forever
        raise FormatError(f"{mpath}: not a regular file")
    try:
        with open(mpath, "rb") as f:
            raw = f.read(knobs.MAX_HEADER_BYTES + 1)
    except FileNotFoundError:
        raise FormatError(
            f"{path}: no {MANIFEST}, so not a checkpoint written by save_distributed (or its save did not finish)"
        ) from None
    if len(raw) > knobs.MAX_HEADER_BYTES:
        raise FormatError(f"{mpath}: larger than {knobs.MAX_HEADER_BYTES} bytes")
    m = unseal(raw, mpath)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise FormatError(f"{mpath}: not a tensorkeep distributed manifest")
    if m.get("version") != VERSION:
        raise FormatError(
            f"{mpath}: version {m.get('version')!r}; this tensorkeep reads version {VERSION}. Upgrade tensorkeep"
        )
    files, tensors = m.get("files"), m.get("tensors")
    if not isinstance(files, dict) or not isinstance(tensors, dict) or "tree" not in m:
        raise FormatError(f"{mpath}: needs 'files', 'tensors' and 'tree'")
    ranks: dict[str, int] = {}
    for name, info in files.items():
        if "/" in name or "\\" in name or name in (".", "..", MANIFEST) or not isinstance(info, dict):
            raise FormatError(f"{mpath}: bad file entry {name!r}")
        if type(info.get("rank")) is not int or type(info.get("size")) is not int or type(info.get("crc32")) is not str:
            raise FormatError(f"{mpath}: file {name!r} needs an int rank, an int size and a crc32 string")
        ranks[name] = info["rank"]
    out = {}
    for key, t in tensors.items():
        if not isinstance(t, dict) or t.get("dtype") not in DTYPE_SIZES or type(t.get("chunks")) is not list:
            raise FormatError(f"{mpath}: tensor {key!r} needs a known dtype and a list of chunks")
        shape = _ints(t.get("shape"), None, f"{mpath}: shape of {key!r}")
        chunks = []
        for c in t["chunks"]:
            if not isinstance(c, dict) or c.get("file") not in ranks:
                raise FormatError(f"{mpath}: a chunk of {key!r} is in a file the manifest does not list")
            chunks.append(
                Chunk(
                    _ints(c.get("offsets"), len(shape), f"{mpath}: offsets in {key!r}"),
                    _ints(c.get("sizes"), len(shape), f"{mpath}: sizes in {key!r}"),
                    ranks[c["file"]],
                )
            )
        if len({c.rank for c in chunks}) != len(chunks):
            raise FormatError(f"{mpath}: tensor {key!r} has two chunks in one file (a file holds one box of a tensor)")
        why = check_cover(key, shape, [(c.offsets, c.sizes) for c in chunks], mpath)
        if why:
            raise FormatError(why)
        out[key] = Stored(t["dtype"], shape, chunks)
    if set(leaf_kinds(m["tree"], mpath)) != set(out):
        raise FormatError(f"{mpath}: the structure does not refer to exactly the manifest's tensors")
    return m, out


def own_files(path: str) -> set[str]:
    """The entries of an existing checkpoint directory ``path`` that a new save may delete: the files
    its ``distributed.json`` lists and itself; :class:`SaveError` if it holds anything else (or is not
    one), so that nothing tensorkeep did not write is ever deleted."""
    if not os.path.lexists(path):
        return set()
    if not _io.is_real_dir(path):
        raise SaveError(
            errno.EEXIST,
            f"{path} exists and is not a directory (a symlink?), so it is not replaced. "
            "Fix: save to a new path, or remove it first",
        )
    names = set(os.listdir(path))
    if not names:
        return set()
    if not _io.is_regular_file(os.path.join(path, MANIFEST)):
        raise SaveError(
            errno.EEXIST,
            f"{path} exists and is not a checkpoint written by save_distributed, so it is "
            "not replaced. Fix: save to a new path, or remove it first",
        )
    try:
        with open(os.path.join(path, MANIFEST), "rb") as f:
            listed = strict_json(f.read(knobs.MAX_HEADER_BYTES + 1), os.path.join(path, MANIFEST)).get("files")
        ours = {n for n in listed if type(n) is str} | {MANIFEST}
    except Exception:
        ours = {n for n in names if is_shard_file(n)} | {MANIFEST}
    foreign = sorted(n for n in names if n not in ours or not _io.is_regular_file(os.path.join(path, n)))
    if foreign:
        shown = ", ".join(repr(n) for n in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise SaveError(
            errno.EEXIST,
            f"{path} holds entries save_distributed did not write ({shown}), so it is not "
            "replaced. Fix: move them out of it, or save to a new path",
        )
    return names
