"""The tensorkeep record in a safetensors header: checksums, block size, the saved structure.

:func:`parse_header` (in :mod:`tensorkeep.core.format`) validates what every safetensors reader
must (sizes, offsets, dtypes); :func:`parse_record` validates what tensorkeep adds on top, so the
two together are the whole validation of a file's header, before a single tensor is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tensorkeep.core.dtypes import numpy_dtype
from tensorkeep.core.format import (
    CRC_KEY,
    FORMAT_VERSION,
    TK_KEY,
    Header,
    check_json_values,
    parse_checksums,
    strict_json,
)
from tensorkeep.core.tree import leaf_kinds, unflatten
from tensorkeep.errors import FormatError


@dataclass
class Record:
    """What a header says beyond safetensors: per-tensor checksums (None for a plain safetensors
    file), their block size, the structure to rebuild, each tensor's kind ("t" torch, "n" NumPy)
    and the user's metadata (tensorkeep's own keys removed)."""

    crcs: Mapping[str, list[int]] | None = None
    block: int = 0
    tree: Any = None
    kinds: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def parse_record(h: Header, path: str) -> Record:
    """Validate the tensorkeep record of a parsed header; a plain safetensors header gives a
    Record with no checksums and every tensor a torch tensor.

    The structure tree is checked only as far as reading single tensors needs (which tensors it
    names, and as what): every node of it is validated by :func:`check_tree`, which loading the
    whole object and ``tk.verify`` run, so opening a file to read one tensor skips that work."""
    meta = dict(h.metadata or {})
    if not h.is_tensorkeep:
        if TK_KEY in meta or CRC_KEY in meta:
            raise FormatError(f"{path}: header has tensorkeep metadata in the wrong place")
        return Record(kinds={n: "t" for n in h.tensors}, metadata=meta)
    record = meta.pop(TK_KEY)
    check_json_values(record.encode("utf-8", "surrogatepass"), f"{path}: tensorkeep metadata")
    info = strict_json(record, f"{path}: tensorkeep metadata")
    meta.pop(CRC_KEY)
    if not isinstance(info, dict) or set(info) != {"v", "block", "tree", "crc"}:
        raise FormatError(f"{path}: tensorkeep metadata must have exactly v, block, tree, crc")
    if info["v"] != FORMAT_VERSION:
        raise FormatError(f"{path}: written by a newer tensorkeep (format {info['v']!r}); upgrade tensorkeep")
    crcs = parse_checksums(info["crc"], info["block"], h, path)
    tree = info["tree"]
    kinds = leaf_kinds(tree, path)
    if set(kinds) != set(h.tensors):
        raise FormatError(f"{path}: stored structure does not refer to exactly the file's tensors")
    for name, kind in kinds.items():
        if kind == "n" and numpy_dtype(h.tensors[name].dtype) is None:
            raise FormatError(f"{path}: NumPy array {name!r} has dtype {h.tensors[name].dtype} that NumPy lacks")
    return Record(crcs, info["block"], tree, kinds, meta)


def check_tree(rec: Record, path: str) -> None:
    """Validate every node of the saved structure: what loading the whole object would refuse."""
    unflatten(rec.tree, None, path)
