"""A staged save's marker torn by a power cut (renamed into place, not yet synced: empty or
garbage) does not make the leftover directory unremovable: the marker is tensorkeep's own name and
goes; what tensorkeep cannot prove is its own stays, with a warning."""

import os
import warnings

import pytest
import torch

import tensorkeep as tk
from tensorkeep.checkpoint.layout import STAGING_MARKER


@pytest.mark.parametrize("torn", [b"", b'{"format": "tensorkeep-stag', b"\x00" * 64], ids=["empty", "cut", "zeros"])
def test_a_torn_marker_is_removed_and_foreign_files_are_kept(tmp, torn):
    run = os.path.join(tmp, "run")
    with tk.CheckpointManager(run) as mgr:
        mgr.save(1, {"w": torch.ones(2)})
    left = os.path.join(run, ".step_00000002.tk-tmp-999999999-0123abcd")  # pid 999999999: no such process
    os.mkdir(left)
    with open(os.path.join(left, STAGING_MARKER), "wb") as f:
        f.write(torn)
    with open(os.path.join(left, "model.tk"), "wb") as f:
        f.write(b"partial")
    with open(os.path.join(left, "notes.txt"), "w") as f:
        f.write("mine")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tk.CheckpointManager(run) as mgr:
            assert mgr.steps() == [1]
    names = sorted(os.listdir(left)) if os.path.isdir(left) else []
    assert names == ["notes.txt"], names
