"""One rank of a torch DCP scenario with tensorkeep's Writer/Reader (started by tests/trainers/test_dcp.py
through tests/ranks.py: gloo on the CPU, a file:// rendezvous).

    python dcp_worker.py SCENARIO RANK WORLD STORE_FILE OUT_DIR DATA_DIR

``ranks``: 2 ranks load DATA_DIR/ck1 (saved by one process) into a Shard(0) DTensor, save DATA_DIR/ck2
(a replicated model, its optimizer, a Shard(0) DTensor, plain values), load it back resharded (Shard(1))
and save it again with ``dcp.async_save``. ``train``, ``kill_write``, ``kill_commit``: a small training
loop that saves DATA_DIR/ckpts/checkpoint-N every 4 steps and, at its start, resumes from the highest
checkpoint-N it sees (what the stock ckpt-chaos ``dcp_ddp`` target does); ``kill_write`` SIGKILLs itself
in the middle of writing its rank file at step 8, ``kill_commit`` after distributed.json is written and
before the rename at step 12. The final weights and optimizer state go to DATA_DIR/final.tk.
``fsdp``: a model sharded with FSDP2 (``fully_shard``) and its Adam take 3 steps and save DATA_DIR/fsdp
(their full state goes to DATA_DIR/fsdp_full.tk); a fresh sharded model loads it, and both take 2 more steps.
"""

from __future__ import annotations

import os
import re
import signal
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

import ranks  # tests/ is on PYTHONPATH (ranks.run puts it there)
import tensorkeep as tk
from ranks import save, worker_main
from tensorkeep.integrations import dcp as tk_dcp
from tensorkeep.storage import local as _io

warnings.filterwarnings("ignore", category=FutureWarning)
STEPS, EVERY = 16, 4


def rows(version: int) -> torch.Tensor:
    """The global (6, 4) tensor "rows" of checkpoint ``version``."""
    return torch.arange(24.0).reshape(6, 4) + 100 * version


def model_and_optimizer(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The same small model on every rank (replicated, as under DDP) and an SGD with momentum, one step taken."""
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    return model, opt


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def scenario_ranks(rank: int, world: int, data: str, out: dict) -> None:
    mesh = init_device_mesh("cpu", (world,))
    # 1 -> 2: a checkpoint one process saved, loaded into a Shard(0) DTensor and a replicated model
    model, opt = model_and_optimizer(seed=1)
    target = {"rows": distribute_tensor(torch.zeros(6, 4), mesh, [Shard(0)]), "model": nn.Linear(4, 3).state_dict()}
    target["step"] = 0
    dcp.load(target, checkpoint_id=os.path.join(data, "ck1"), storage_reader=tk_dcp.Reader())
    out["ck1_rows"] = torch.equal(target["rows"].full_tensor(), rows(1))
    out["ck1_local_rows"] = target["rows"].to_local().shape[0]
    out["ck1_model"] = same(target["model"], model.state_dict())
    out["ck1_step"] = target["step"]
    # 2 ranks save: a Shard(0) DTensor, a replicated model and optimizer (each written once), plain values
    model, opt = model_and_optimizer(seed=2)
    state = {
        "rows": distribute_tensor(rows(2), mesh, [Shard(0)]),
        "one_row": distribute_tensor(rows(2)[:1], mesh, [Shard(0)]),  # rank 1's shard is empty
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "step": 2,
        "tag": "two ranks",
    }
    dcp.save(state, checkpoint_id=os.path.join(data, "ck2"), storage_writer=tk_dcp.Writer())
    # ... loaded back on 2 ranks, resharded (Shard(1)), into a fresh model and optimizer
    model3, opt3 = model_and_optimizer(seed=3)
    back = {
        "rows": distribute_tensor(torch.zeros(6, 4), mesh, [Shard(1)]),
        "one_row": distribute_tensor(torch.zeros(1, 4), mesh, [Shard(0)]),
        "model": model3.state_dict(),
        "optim": opt3.state_dict(),
        "step": 0,
        "tag": "",
    }
    dcp.load(back, checkpoint_id=os.path.join(data, "ck2"), storage_reader=tk_dcp.Reader())
    out["ck2_rows"] = torch.equal(back["rows"].full_tensor(), rows(2))
    out["ck2_one_row"] = torch.equal(back["one_row"].full_tensor(), rows(2)[:1])
    out["ck2_model"] = same(model3.state_dict(), model.state_dict())
    out["ck2_momentum"] = all(
        torch.equal(opt3.state_dict()["state"][i]["momentum_buffer"], opt.state_dict()["state"][i]["momentum_buffer"])
        for i in (0, 1)
    )
    out["ck2_values"] = [back["step"], back["tag"], back["optim"]["param_groups"][0]["momentum"]]
    # async_save on 2 ranks (DCP's thread executor, collectives over gloo from the background thread)
    fut = dcp.async_save(state, checkpoint_id=os.path.join(data, "ck2async"), storage_writer=tk_dcp.Writer())
    fut.result()
    dist.barrier()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)


def visible_checkpoints(ckpts: str) -> list[int]:
    """The checkpoint-N directories a resume sees (tensorkeep's temporary ones are hidden: '.checkpoint-N...')."""
    names = os.listdir(ckpts) if os.path.isdir(ckpts) else []
    return sorted(int(n.split("-")[1]) for n in names if re.fullmatch(r"checkpoint-\d+", n))


def arm_kill(kill: str) -> None:
    """SIGKILL this process at the named point of the next save."""
    if kill == "write":  # 100 bytes into the rank file
        _io.pwrite_all = ranks.failing_write(100, "sigkill")
    else:  # distributed.json written and fsynced, the directory not renamed yet

        def die(*args: object, **kwargs: object) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        _io.replace_dir = die


def train(rank: int, data: str, out: dict, kill: str | None = None, kill_step: int = 0) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ckpts = os.path.join(data, "ckpts")
    start = (visible_checkpoints(ckpts) or [0])[-1]
    if start:
        model_sd, opt_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": opt_sd, "step": 0}
        dcp.load(state, checkpoint_id=os.path.join(ckpts, f"checkpoint-{start}"), storage_reader=tk_dcp.Reader())
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        assert state["step"] == start, state["step"]
    out["resumed_from"] = start
    for step in range(start + 1, STEPS + 1):
        x, y = batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % EVERY == 0:
            if kill and step == kill_step:
                save(out, rank)
                arm_kill(kill)
            model_sd, opt_sd = get_state_dict(model, opt)
            dcp.save(
                {"model": model_sd, "optim": opt_sd, "step": step},
                checkpoint_id=os.path.join(ckpts, f"checkpoint-{step}"),
                storage_writer=tk_dcp.Writer(),
            )
    model_sd, opt_sd = get_state_dict(model, opt)
    tk.save({"model": model_sd, "optim": opt_sd}, os.path.join(data, "final.tk"))


def fsdp_model(mesh: object | None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The same small MLP on every rank; with a ``mesh``, each Linear and the root sharded by FSDP2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    if mesh is not None:
        for layer in (model[0], model[2], model):
            fully_shard(layer, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def fsdp_steps(model: nn.Module, opt: torch.optim.Optimizer, rank: int, steps: range) -> None:
    for step in steps:
        x, y = batch(100 * step + rank)  # each rank its own data, as under FSDP
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    model_sd, opt_sd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": model_sd, "optim": opt_sd}


def scenario_fsdp(rank: int, world: int, data: str, out: dict) -> None:
    mesh = init_device_mesh("cpu", (world,))
    model, opt = fsdp_model(mesh)
    fsdp_steps(model, opt, rank, range(3))
    model_sd, opt_sd = get_state_dict(model, opt)
    out["sharded"] = all(type(t).__name__ == "DTensor" for t in model_sd.values())
    dcp.save({"model": model_sd, "optim": opt_sd, "step": 3}, checkpoint_id=os.path.join(data, "fsdp"),
             storage_writer=tk_dcp.Writer())  # fmt: skip
    full = full_state(model, opt)  # a collective: every rank takes part
    if rank == 0:
        tk.save(full, os.path.join(data, "fsdp_full.tk"))
    model2, opt2 = fsdp_model(mesh)  # a fresh start, as after a restart
    model_sd, opt_sd = get_state_dict(model2, opt2)
    state = {"model": model_sd, "optim": opt_sd, "step": 0}
    dcp.load(state, checkpoint_id=os.path.join(data, "fsdp"), storage_reader=tk_dcp.Reader())
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    out["step"] = state["step"]
    fsdp_steps(model, opt, rank, range(3, 5))
    fsdp_steps(model2, opt2, rank, range(3, 5))
    a, b = full_state(model, opt), full_state(model2, opt2)  # full state dicts reach rank 0 only
    if rank == 0:
        out["resumed_same"] = same(a["model"], b["model"]) and all(
            same(a["optim"]["state"][k], b["optim"]["state"][k]) for k in a["optim"]["state"]
        )


if __name__ == "__main__":
    worker_main(
        {
            "ranks": scenario_ranks,
            "fsdp": scenario_fsdp,
            "train": lambda rank, world, data, out: train(rank, data, out),
            "kill_write": lambda rank, world, data, out: train(rank, data, out, "write", 8),
            "kill_commit": lambda rank, world, data, out: train(rank, data, out, "commit", 12),
        }
    )
