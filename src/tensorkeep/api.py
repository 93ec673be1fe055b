"""The front door: ``save``, ``load`` and ``open`` of a file, a sharded model directory, a
distributed checkpoint or an object in a store — the layers below each do one kind.

>>> import torch, tensorkeep as tk
>>> tk.save({"w": torch.ones(2), "step": 3}, "/tmp/tk-doc.tk")
>>> tk.load("/tmp/tk-doc.tk")
{'w': tensor([1., 1.]), 'step': 3}
"""

from __future__ import annotations

import os
from typing import Any

from tensorkeep.distributed.load import load_distributed
from tensorkeep.distributed.manifest import MANIFEST as DISTRIBUTED
from tensorkeep.file.reader import read_file
from tensorkeep.file.safeopen import SafeOpen, open
from tensorkeep.file.writer import save
from tensorkeep.layouts.sharded import load_dir
from tensorkeep.storage import resolve

__all__ = ["SafeOpen", "load", "open", "save"]


def load(path: str | os.PathLike[str], *, device: Any = None, lazy: bool = False, verify: bool = True) -> Any:
    """Load what :func:`save` wrote, with the same structure and types.

    Also reads plain safetensors files (a flat dict of tensors comes back), ``.pt``/``.pth``/``.bin``
    files (through ``torch.load(weights_only=True)`` only, their pickle scanned first), sharded
    model directories (``model.safetensors.index.json``) and directories written by
    :func:`tensorkeep.save_distributed`, on disk or in an object store (``s3://…``).
    ``lazy=True`` maps the file instead of reading it; ``verify`` checks every checksum (for a
    ``.pt``, the CRC-32 its zip archive stores for each entry, which torch itself ignores).
    A mapped tensor is verified once, when mapped; its pages stay backed by the file, so another
    program editing the file in place later changes it, and truncating the file kills the process
    with SIGBUS when such a page is touched. Use the default ``lazy=False`` when that can happen.

    >>> import torch, tensorkeep as tk
    >>> tk.save([torch.arange(4), torch.zeros(4)], "/tmp/tk-doc-x-files")
    >>> x2, y2 = tk.load("/tmp/tk-doc-x-files")
    >>> x2
    tensor([0, 1, 2, 3])
    """
    backend, key = resolve(path)
    if backend.local and os.path.isdir(backend.path(key)):
        d = backend.path(key)
        if os.path.isfile(os.path.join(d, DISTRIBUTED)):  # written by tk.save_distributed
            return load_distributed(None, d, device=device)
        return load_dir(d, device=device, lazy=lazy, verify=verify)  # a sharded model directory
    return read_file(path, device=device, lazy=lazy, verify=verify)
