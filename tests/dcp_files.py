"""DCP checkpoint directories built by hand, for the hostile-input tests (tests/distributed/test_dcp_hostile.py,
tests/file/test_hostile_inputs_2.py): a ``.metadata`` pickled from torch's own DCP classes, with
values no DCP save would write."""

from __future__ import annotations

import os
import pickle

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)


def write_dir(path: str, metadata: bytes, files: dict | None = None) -> str:
    """A DCP directory at ``path``: ``.metadata`` and the data ``files`` ({name: bytes})."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, ".metadata"), "wb") as f:
        f.write(metadata)
    for name, data in (files or {}).items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    return path


def meta(tensors=(), values=(), planner=None, dtype=torch.float32) -> bytes:
    """A DCP .metadata pickled from torch's own classes. tensors: (fqn, size, [(offsets, sizes,
    (file, start, length) or None for no storage entry)]); values: (fqn, (file, start, length))."""
    sdm, storage = {}, {}
    for fqn, size, chunks in tensors:
        size = torch.Size(size) if all(type(d) is int for d in size) else size
        sdm[fqn] = TensorStorageMetadata(
            TensorProperties(dtype=dtype),
            size,
            [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s, _ in chunks],
        )
        for o, _, where in chunks:
            if where:
                storage[MetadataIndex(fqn, o)] = _StorageInfo(*where)
    for fqn, where in values:
        sdm[fqn] = BytesStorageMetadata()
        if where:
            storage[MetadataIndex(fqn)] = _StorageInfo(*where)
    return pickle.dumps(Metadata(sdm, planner_data=planner, storage_data=storage), protocol=4)
