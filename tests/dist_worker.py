"""One rank of a distributed test scenario (started by tests/distributed/test_distributed.py).

    python dist_worker.py SCENARIO RANK WORLD STORE_FILE OUT_DIR DATA_DIR

Gloo on CPU, rendezvous through a file store, sockets on the loopback interface only.
Each rank writes OUT_DIR/rank{R}.json (what it saw) or OUT_DIR/rank{R}.err (a traceback).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh

import ranks
import tensorkeep as tk
from ranks import save, worker_main

S0, S1, R = Shard(0), Shard(1), Replicate()
# placements of the DTensors "rows" (10 x 6, float32), "cols" (5 x 12, float64), "rep" (6,) per scenario
LAYOUTS = {
    "A": {"mesh": (4,), "rows": [S0], "cols": [S1], "rep": [R]},
    "B": {"mesh": (2,), "rows": [S1], "cols": [S0], "rep": [S0]},
    "C": {"mesh": (2, 2), "rows": [S0, S1], "cols": [R, S0], "rep": [S0, R]},  # 2-D: [R, S0] is held twice
}
_MESHES: dict = {}
PLAIN = {"model.embed": (64, 32), "model.head": (16, 32), "model.bias": (32,)}


def full(key: str, shape: tuple, version: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The exact global value of tensor ``key`` in checkpoint ``version``."""
    seed = sum(map(ord, key)) % 97
    return (torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape) * 0.25 + seed + 1000 * version).to(dtype)


def make_state(layout: str, version: int, zeros: bool = False) -> tuple[dict, nn.Module]:
    """The training state of ``version`` in ``layout`` (``zeros``: a blank target to load into)."""
    lay = LAYOUTS[layout]
    if lay["mesh"] not in _MESHES:
        names = ("replicate", "shard")[-len(lay["mesh"]) :]  # a 2-D mesh: HSDP
        _MESHES[lay["mesh"]] = init_device_mesh("cpu", lay["mesh"], mesh_dim_names=names)
    mesh = _MESHES[lay["mesh"]]

    def val(key: str, shape: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype) if zeros else full(key, shape, version, dtype)

    def dt(key: str, shape: tuple, placements: list, dtype: torch.dtype = torch.float32) -> DTensor:
        return distribute_tensor(val(key, shape, dtype), mesh, placements)

    net = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 4))
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(val(f"fsdp.{n}", tuple(p.shape)))
    fully_shard(net, mesh=mesh)  # a 2-D mesh: HSDP, parameters [Replicate(), Shard(0)]
    state = {
        "model": {k.split(".")[1]: val(k, s) for k, s in PLAIN.items()},
        "rows": dt("rows", (10, 6), lay["rows"]),
        "cols": dt("cols", (5, 12), lay["cols"], torch.float64),
        "rep": dt("rep", (6,), lay["rep"]),
        "fsdp": net.state_dict(),
        "optim": {
            "state": {
                0: {"step": val("step0", ()), "exp_avg": dt("exp_avg0", (10, 6), lay["rows"])},
                1: {"step": val("step1", ()), "exp_avg": dt("exp_avg1", (5, 12), lay["cols"], torch.float64)},
            },
            "param_groups": [{"lr": 0.0 if zeros else 0.01 * version, "betas": (0.9, 0.999), "params": [0, 1]}],
        },
        "step": 0 if zeros else 100 + version,
        "tag": "" if zeros else f"run-α-{version}",
        "np": np.zeros(4) if zeros else np.arange(4.0) + version,
    }
    return state, net


def check_state(state: dict, net: nn.Module, version: int) -> None:
    """Every value of ``state`` (and ``net``'s parameters) is exactly the one of ``version``."""

    def same(x: torch.Tensor, key: str) -> None:
        got = x.full_tensor() if isinstance(x, DTensor) else x
        want = full(key, tuple(got.shape), version, got.dtype)
        assert torch.equal(got, want), f"{key}: {got} != {want}"

    for k in PLAIN:
        same(state["model"][k.split(".")[1]], k)
    for k in ("rows", "cols", "rep"):
        same(state[k], k)
    for n, p in net.named_parameters():  # filled in place through net.state_dict()
        same(p, f"fsdp.{n}")
    for i in (0, 1):
        same(state["optim"]["state"][i]["step"], f"step{i}")
        same(state["optim"]["state"][i]["exp_avg"], f"exp_avg{i}")
    assert state["optim"]["param_groups"] == [{"lr": 0.01 * version, "betas": (0.9, 0.999), "params": [0, 1]}]
    assert state["step"] == 100 + version and state["tag"] == f"run-α-{version}"
    assert np.array_equal(state["np"], np.arange(4.0) + version)


def round_trip(layout: str, version: int, path: str) -> None:
    state, _ = make_state(layout, version)
    tk.save_distributed(state, path)
    target, net = make_state(layout, 0, zeros=True)
    assert tk.load_distributed(target, path) is target
    check_state(target, net, version)


def failed_save(state: dict, path: str, rank: int, culprit: int, action: str) -> str:
    """Save with rank ``culprit`` failing mid-write; returns the error this rank saw."""
    return ranks.failed_save(lambda: tk.save_distributed(state, path), rank, culprit, 1000, action)


def scenario_a(rank: int, data: str, out: dict) -> None:
    """4 ranks: round trips, an existing checkpoint replaced, failures on one rank, then rank 3 killed."""
    path = os.path.join(data, "ck4")
    round_trip("A", 1, path)
    round_trip("A", 2, path)  # replaces the first
    state, _ = make_state("A", 2)
    del state["np"]  # a NumPy array is not something torch.load(weights_only=True) reads back
    dcp.save(state, checkpoint_id=os.path.join(data, "dcp4"))  # for tk.convert_dcp
    state, _ = make_state("A", 3)
    out["enospc"] = failed_save(state, path, rank, 2, "raise")
    bad = dict(state, extra=torch.zeros(3)) if rank == 1 else state
    try:
        tk.save_distributed(bad, path)
    except tk.SaveError as e:
        out["mismatch"] = str(e)
    weird = dict(state, odd={1, 2}) if rank == 3 else state
    try:
        tk.save_distributed(weird, path)
    except tk.SaveError as e:
        out["unsupported"] = str(e)
    target, net = make_state("A", 0, zeros=True)
    tk.load_distributed(target, path)
    check_state(target, net, 2)  # every failed save left version 2 in place
    out["ok"] = True
    save(out, rank)
    out["killed"] = failed_save(state, path, rank, 3, "sigkill")


def scenario_b(rank: int, data: str, out: dict) -> None:
    """2 ranks: load the 4-rank checkpoint resharded, save a 2-rank one, then rank 0 dies mid-save."""
    target, net = make_state("B", 0, zeros=True)
    tk.load_distributed(target, os.path.join(data, "ck4"))
    check_state(target, net, 2)
    path = os.path.join(data, "ck2")
    round_trip("B", 5, path)
    out["ok"] = True
    save(out, rank)
    state, _ = make_state("B", 6)
    out["rank0_died"] = failed_save(state, path, rank, 0, "exit")


def scenario_c(rank: int, data: str, out: dict) -> None:
    """4 ranks on a 2x2 mesh: load the 2-rank checkpoint, save one over it (HSDP: shared boxes)."""
    path = os.path.join(data, "ck2")
    target, net = make_state("C", 0, zeros=True)
    tk.load_distributed(target, path)
    check_state(target, net, 5)
    round_trip("C", 7, path)
    out["ok"] = True


if __name__ == "__main__":
    worker_main(
        {
            "A": lambda rank, world, data, out: scenario_a(rank, data, out),
            "B": lambda rank, world, data, out: scenario_b(rank, data, out),
            "C": lambda rank, world, data, out: scenario_c(rank, data, out),
        }
    )
