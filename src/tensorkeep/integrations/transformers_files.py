"""Files of :mod:`tensorkeep.integrations.transformers`: stock checkpoints found for migration, and the
``safetensors`` writes of ``save_pretrained`` redirected into a staged checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import safetensors.torch
import transformers.modeling_utils as _modeling
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from tensorkeep.checkpoint.stage import Stage

NAME_RE = re.compile(re.escape(PREFIX_CHECKPOINT_DIR) + r"-(\d+)")  #: a Trainer's checkpoint directory name
STATE = "trainer_state.json"


def newest_stock(run_dir: str) -> tuple[int, str] | None:
    """The newest ``checkpoint-N`` written by a stock Trainer that looks complete: its pickled
    ``training_args.bin`` (which tensorkeep's checkpoints never hold, even partly deleted) and a
    ``trainer_state.json`` that parses (stock writes it last); no manifest, no tensorkeep file."""
    found: list[tuple[int, str]] = []
    for n in os.listdir(run_dir):
        m = NAME_RE.fullmatch(n)
        p = os.path.join(run_dir, n)
        if m is None or os.path.islink(p) or not os.path.isdir(p):
            continue
        names = os.listdir(p)
        if "training_args.bin" not in names or "manifest.json" in names or any(x.endswith(".tk") for x in names):
            continue
        try:
            with open(os.path.join(p, STATE), encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError):
            continue
        found.append((int(m.group(1)), p))
    return max(found, default=None)


@contextlib.contextmanager
def safetensors_into(st: Stage) -> Iterator[None]:
    """While ``st`` is staged, ``safetensors.torch.save_file`` (as ``save_pretrained`` and
    ``Trainer._save`` call it) writes a tensorkeep file when the target is in ``st.path``: readable by
    every safetensors reader, with per-tensor checksums, recorded in the manifest by ``Stage.write``.
    Any other target gets the real function."""
    originals = (_modeling.safe_save_file, safetensors.torch.save_file)

    def save_file(
        tensors: dict[str, Any], filename: str | os.PathLike[Any], metadata: dict[str, str] | None = None
    ) -> None:
        folder, name = os.path.split(os.path.abspath(os.fspath(filename)))
        if folder != st.path:
            return originals[1](tensors, filename, metadata=metadata)
        st.write(name, dict(tensors), key="model", metadata=dict(metadata or {}))

    _modeling.safe_save_file = save_file
    safetensors.torch.save_file = save_file
    try:
        yield
    finally:
        _modeling.safe_save_file, safetensors.torch.save_file = originals
