"""CheckpointManager edge cases: pid reuse of a lock, odd metrics, RNG-neutral saves, swapped files."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import tensorkeep as tk
from tensorkeep.checkpoint import layout


def test_lock_left_by_a_dead_job_with_our_pid_is_taken_over(tmp):
    # a restarted container often gets the pid its killed predecessor had: the lock file then names us
    with open(os.path.join(tmp, ".tensorkeep.lock"), "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
    with tk.CheckpointManager(tmp) as mgr:
        mgr.save(1, {"a": 1})
        with pytest.raises(tk.LockedError, match="already open by another CheckpointManager in this process"):
            tk.CheckpointManager(tmp)
    assert not os.path.exists(os.path.join(tmp, ".tensorkeep.lock"))


def test_lock_is_released_when_its_owner_is_killed(tmp):
    code = (
        f"import sys, tensorkeep as tk\nm = tk.CheckpointManager({tmp!r})\nprint('HELD', flush=True)\n"
        "sys.stdin.read()\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "HELD"
        with pytest.raises(tk.LockedError, match=f"in use by process {p.pid}"):
            tk.CheckpointManager(tmp)
    finally:
        p.kill()  # SIGKILL: no chance to clean up
        p.wait()
    assert os.path.exists(os.path.join(tmp, ".tensorkeep.lock"))  # the file stays, the lock does not
    with tk.CheckpointManager(tmp) as mgr:
        assert mgr.save(1, {"a": 1})


def test_nan_and_numpy_metrics_round_trip(tmp):
    with tk.CheckpointManager(tmp, keep_best=("loss", "min")) as mgr:
        mgr.save(1, {"a": 1}, metrics={"loss": np.float32(0.5), "acc": torch.tensor(0.25)})
        mgr.save(2, {"a": 2}, metrics={"loss": float("nan"), "grad_norm": float("inf")})  # a diverged step
    with tk.CheckpointManager(tmp, keep_best=("loss", "min")) as mgr:
        assert mgr.metrics(1) == {"loss": 0.5, "acc": 0.25} and type(mgr.metrics(1)["loss"]) is float
        m2 = mgr.metrics(2)
        assert math.isnan(m2["loss"]) and m2["grad_norm"] == math.inf
        assert mgr.best_step() == 1 and mgr.latest_step() == 2
    with tk.CheckpointManager(tmp) as mgr:
        with pytest.raises(TypeError, match=r"metric 'hist' must be a number or a string.*float\(value\)"):
            mgr.save(3, {"a": 3}, metrics={"hist": [1, 2]})
        assert mgr.steps() == [1, 2]


def test_save_does_not_move_any_rng(tmp):
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    ds = torch.utils.data.TensorDataset(torch.arange(10.0))
    loader = sdl.StatefulDataLoader(ds, batch_size=2, shuffle=True)  # no iterator yet: state_dict() makes one
    net = torch.nn.Linear(2, 2)
    with tk.CheckpointManager(tmp) as mgr:
        torch.manual_seed(7)
        want = torch.rand(3)
        torch.manual_seed(7)
        mgr.save(1, {"loader": loader, "net": net})
        assert torch.equal(torch.rand(3), want)


def test_file_swapped_from_another_step_is_detected(tmp):
    net = torch.nn.Linear(3, 3)
    with tk.CheckpointManager(tmp) as mgr:
        mgr.save(1, {"model": net})
        want = {k: v.clone() for k, v in net.state_dict().items()}
        with torch.no_grad():
            net.weight.add_(1)
        mgr.save(2, {"model": net})
    shutil.copy(os.path.join(layout.step_dir(tmp, 1), "model.tk"), os.path.join(layout.step_dir(tmp, 2), "model.tk"))
    fresh = torch.nn.Linear(3, 3)
    with warnings.catch_warnings(record=True) as w, tk.CheckpointManager(tmp) as mgr:
        warnings.simplefilter("always")
        with pytest.raises(tk.CheckpointNotFoundError, match=r"header checksum.*not the file.*Steps that exist"):
            mgr.restore({"model": fresh}, step=2)
        assert mgr.restore({"model": fresh}) == 1
    assert any("step_00000002" in str(x.message) for x in w)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in want.items())
