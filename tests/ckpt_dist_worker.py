"""One rank of a CheckpointManager-with-torch.distributed scenario (tests/distributed/test_checkpoint_distributed.py).

    python ckpt_dist_worker.py SCENARIO RANK WORLD STORE_FILE OUT_DIR DATA_DIR

Gloo on CPU, rendezvous through a file store, sockets on the loopback interface only. Each rank
writes OUT_DIR/rank{R}.json (what it saw) or OUT_DIR/rank{R}.err (a traceback). Rank 0 writes
DATA_DIR/expect-{step}.tk: the whole state of each checkpoint it saved, to compare restores with.
"""

from __future__ import annotations

import math
import os
import random
import signal
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh
from torch.nn.parallel import DistributedDataParallel

import ranks
import tensorkeep as tk
from ranks import save, worker_main

_DDP: dict[int, DistributedDataParallel] = {}  # id(model) -> its DDP wrapper (the state holds the model)
TABLE = (16, 4)  # a DTensor, Shard(0) over every rank


def build(world: int | None) -> dict:
    """A fresh training state: a DDP model and its Adam, a sharded table, an FSDP2 layer and its Adam.
    ``world`` None: the same objects, plain, in one process without a process group."""
    torch.manual_seed(0)  # the same initial weights everywhere
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    fs = nn.Linear(4, 8)
    table = torch.zeros(TABLE)
    if world is not None:
        _DDP[id(net)] = DistributedDataParallel(net)  # broadcasts rank 0's weights
        mesh = init_device_mesh("cpu", (world,))
        table = distribute_tensor(table, mesh, [Shard(0)])
        fully_shard(fs, mesh=mesh)
    return {
        "model": net,
        "optimizer": torch.optim.Adam(net.parameters(), lr=0.01),
        "table": table,
        "fsdp": fs,
        "fsdp_opt": torch.optim.Adam(fs.parameters(), lr=0.1),
        "epoch": 0,
    }


def train(state: dict, step: int) -> None:
    """One step; every rank draws its own random numbers (its data, its shard's updates)."""
    net, opt = state["model"], state["optimizer"]
    opt.zero_grad()
    _DDP.get(id(net), net)(torch.randn(5, 6)).pow(2).mean().backward()  # DDP averages the gradients
    opt.step()
    for p in state["fsdp"].parameters():
        local = torch.rand(p.to_local().shape) if isinstance(p, DTensor) else torch.rand(p.shape)
        p.grad = DTensor.from_local(local, p.device_mesh, p.placements) if isinstance(p, DTensor) else local
    state["fsdp_opt"].step()
    with torch.no_grad():
        t = state["table"].to_local() if isinstance(state["table"], DTensor) else state["table"]
        t.add_(torch.rand(t.shape))
    state["epoch"] = step


def _whole(x):
    if isinstance(x, DTensor):
        return x.full_tensor()
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _whole(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_whole(v) for v in x)
    return x


def whole(state: dict) -> dict:
    """Everything in ``state`` as plain, whole tensors (collective when it holds DTensors)."""
    return {k: _whole(v.state_dict() if hasattr(v, "load_state_dict") else v) for k, v in state.items()}


def differences(a, b, path="state") -> list[str]:
    """Where two ``whole`` results differ (bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if ok else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}[{k!r}]")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def same_as(state: dict, data: str, step: int) -> None:
    diff = differences(whole(state), tk.load(os.path.join(data, f"expect-{step}.tk")))
    assert not diff, f"restored state differs from step {step}: {diff[:5]}"


def draws() -> list:
    return [random.random(), float(np.random.rand()), torch.rand(2).tolist()]


def failed_save(mgr, step: int, state: dict, rank: int, culprit: int, action: str) -> str:
    """A save in which rank ``culprit`` fails mid-write; returns the error this rank saw."""
    return ranks.failed_save(lambda: mgr.save(step, state), rank, culprit, 300, action)


def hidden(d: str) -> list[str]:
    return sorted(n for n in os.listdir(d) if ".tk-tmp-" in n)


def scenario_four(rank: int, world: int, data: str, out: dict) -> None:
    """4 ranks: saves with keep_last=2, a same-world restore (per-rank RNG), failures, then rank 0 killed."""
    run = os.path.join(data, "run")
    random.seed(rank), np.random.seed(rank), torch.manual_seed(100 + rank)
    state = build(world)
    mgr = tk.CheckpointManager(run, keep_last=2, keep_best=("loss", "min"))
    assert mgr.restore(state) is None
    random.seed(rank), np.random.seed(rank), torch.manual_seed(100 + rank)  # build() seeded torch alike
    out["steps"] = []
    for step in range(1, 5):
        train(state, step)
        mgr.save(step, state, metrics={"loss": 1.0 / step if step != 3 else math.nan, "rank": rank})
        out["steps"].append(mgr.steps())
        expect = whole(state)
        if rank == 0:
            tk.save(expect, os.path.join(data, f"expect-{step}.tk"))
    out["best"], out["metrics3"] = mgr.best_step(), mgr.metrics(3)
    out["draws4"] = draws()  # what the RNG gives right after checkpoint 4
    train(state, 5)
    assert mgr.restore(state) == 4
    out["draws4_again"] = draws()
    dist.barrier()  # rank 0's expect-4.tk is written
    same_as(state, data, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tk.CheckpointManager(run)  # rank 0 holds the lock: every rank is told
        except tk.LockedError as e:
            out["locked"] = str(e)
    train(state, 5)
    out["enospc"] = failed_save(mgr, 5, state, rank, 2, "raise")
    out["steps_after_enospc"] = mgr.steps()
    if rank == 0:
        out["hidden_after_enospc"] = hidden(run)
    odd = dict(state, odd={1, 2}) if rank == 3 else state
    try:
        mgr.save(5, odd)
    except tk.SaveError as e:
        out["unsupported"] = str(e)
    try:
        mgr.save(5 + (rank == 1), state)
    except tk.SaveError as e:
        out["other_step"] = str(e)
    mgr.save_interval_seconds = 1000.0
    if rank == 1:
        mgr._last_save_time -= 2000  # only rank 1's clock says a checkpoint is due
    out["due"] = mgr.should_save(5)
    mgr.save_interval_seconds = None
    mgr.save_on_signal(state)
    if rank == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's signal reached one rank only
    out["preempted"] = [mgr.should_save(5), mgr.preempted]  # every rank checkpoints, then exits
    mgr._preempted = None
    mgr.save(5, state, metrics={"loss": 0.1})  # the group still works after the failures
    out["steps_final"] = mgr.steps()
    expect = whole(state)
    if rank == 0:
        tk.save(expect, os.path.join(data, "expect-5.tk"))
    out["draws5"] = draws()
    save(out, rank)
    train(state, 6)
    out["killed"] = failed_save(mgr, 6, state, rank, 0, "sigkill")


def scenario_two(rank: int, world: int, data: str, out: dict) -> None:
    """2 ranks: restore the 4-rank run resharded (a checkpoint damaged on one rank's share skipped
    together), roll back, save on 2 ranks; async_save refused."""
    torch.manual_seed(7 + rank)
    state = build(world)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mgr = tk.CheckpointManager(os.path.join(data, "damaged"))
        out["damaged_restore"] = mgr.restore(state)
        mgr.close()
    out["damaged_warnings"] = [str(w.message) for w in caught]
    same_as(state, data, 4)
    out["optimizer_state_sharded"] = all(
        isinstance(v, DTensor) for s in state["fsdp_opt"].state.values() for k, v in s.items() if k != "step"
    )
    state = build(world)
    before = torch.get_rng_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mgr = tk.CheckpointManager(os.path.join(data, "run"), keep_last=2)
        out["restored"] = mgr.restore(state)
    out["warnings"] = [str(w.message) for w in caught]
    out["rng_kept"] = torch.equal(before, torch.get_rng_state())
    same_as(state, data, 5)
    assert mgr.restore(state, step=4) == 4
    same_as(state, data, 4)
    assert mgr.restore(state) == 5
    out["steps"] = mgr.steps()
    train(state, 6)  # the restored FSDP2 optimizer steps: its state is sharded like its parameters
    mgr.save(6, state, metrics={"loss": 0.05})
    out["steps_after_save"] = mgr.steps()
    expect = whole(state)
    if rank == 0:
        tk.save(expect, os.path.join(data, "expect-6.tk"))
    try:
        tk.CheckpointManager(os.path.join(data, "async"), async_save=True)
    except ValueError as e:
        out["async"] = str(e)
    mgr.close()
    lin, plain = torch.nn.Linear(4, 4), {"lin": None, "note": None}
    plain["lin"] = lin
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "saved by one process: the RNG states are not restored"
        with tk.CheckpointManager(os.path.join(data, "one-file")) as one:
            step = one.restore(plain)
    out["one_file"] = [step, bool(torch.all(lin.weight == 3.0)), plain["note"]]


if __name__ == "__main__":
    worker_main({"four": scenario_four, "two": scenario_two})
