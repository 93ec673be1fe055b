"""CheckpointManager records what bit-exact resume depends on, and restore() says what differs."""

from __future__ import annotations

import warnings

import pytest
import torch

import tensorkeep as tk
from tensorkeep.checkpoint import layout


def test_manifest_records_the_environment_and_restore_warns_when_it_differs(tmp):
    net = torch.nn.Linear(3, 3)
    threads = torch.get_num_threads()
    with tk.CheckpointManager(tmp) as mgr:
        mgr.save(1, {"model": net})
    env = layout.read_manifest(layout.step_dir(tmp, 1)).environment
    assert env["threads"] == threads and env["devices"] == ["cpu"] and env["torch"] == torch.__version__
    with tk.CheckpointManager(tmp) as mgr, warnings.catch_warnings():
        warnings.simplefilter("error")  # same process, same settings: nothing to say
        assert mgr.restore({"model": net}) == 1
    torch.set_num_threads(threads + 1)
    try:
        with tk.CheckpointManager(tmp) as mgr:
            with pytest.warns(UserWarning, match=rf"torch threads: saved with {threads}, now {threads + 1}"):
                assert mgr.restore({"model": net}) == 1
    finally:
        torch.set_num_threads(threads)
