"""One rank of a staged-commit scenario over torch.distributed (tests/trainers/test_stage_ranks.py).

    python stage_worker.py SCENARIO RANK WORLD STORE_FILE OUT_DIR DATA_DIR

Gloo on the CPU, a file:// rendezvous, loopback only (tests/ranks.py). Each rank writes
OUT_DIR/rank{R}.json (what it saw) or OUT_DIR/rank{R}.err (a traceback).
"""

from __future__ import annotations

import json
import os
import warnings

import torch

import ranks
import tensorkeep as tk
from tensorkeep.checkpoint import layout
from tensorkeep.checkpoint.intact import latest_intact
from tensorkeep.checkpoint.stage import stage
from tensorkeep.distributed.comm import Comm
from tensorkeep.errors import FormatError
from tensorkeep.storage import local as _io

NAMING = "checkpoint-{step}"


def hidden(d: str) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith(".") and n != ".tensorkeep.lock")


def put(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def save_step(mgr: tk.CheckpointManager, step: int, rank: int) -> str:
    """What a trainer's save does on each rank: rank 0 the shared state and a config written by other
    code, every rank its own RNG file (st.write) and a file of its own (written by other code)."""
    with mgr.stage(step, metrics={"loss": 0.5 if rank == 0 else 9.0, "rank": rank}) as st:
        if rank == 0:
            st.write("model.tk", {"w": torch.full((64,), float(step))}, key="model")
            put(os.path.join(st.path, "config.json"), json.dumps({"step": step}))
        st.write(f"rng_state_{rank}.tk", {"cpu": torch.get_rng_state()}, key="rng")
        put(os.path.join(st.path, f"extra_{rank}.json"), json.dumps({"rank": rank}))
        path = st.path
    return path


def scenario_stage(rank: int, world: int, data: str, out: dict) -> None:
    """Commits with files from every rank, failures on one rank, a name clash, agreement on resume."""
    run = os.path.join(data, "run")
    mgr = tk.CheckpointManager(run, naming=NAMING, keep_last=2)
    out["path"] = save_step(mgr, 1, rank)  # the same temporary directory on every rank
    final = mgr.path(1)
    out["committed_on_return"] = os.path.isfile(os.path.join(final, layout.MANIFEST))  # no rank runs ahead
    out["files"] = sorted(layout.read_manifest(final).files)
    out["listing"] = sorted(os.listdir(final))
    out["steps1"], out["metrics1"] = mgr.steps(), mgr.metrics(1)  # rank 0's metrics on every rank

    try:  # an exception on rank 1 after it wrote a file: nothing published anywhere
        with mgr.stage(2) as st:
            put(os.path.join(st.path, f"part_{rank}.txt"), "x")
            if rank == 1:
                raise RuntimeError("injected on rank 1")
    except tk.SaveError as e:
        out["failed"] = str(e)
        out["cause"] = type(e.__cause__).__name__  # rank 1: its own error, chained

    out["enospc"] = ranks.failed_save(lambda: save_step(mgr, 2, rank), rank, 1, 100, "raise")  # mid-write
    try:
        with mgr.stage(2) as st:
            st.write("same.tk", {"rank": rank})
    except tk.SaveError as e:
        out["clash"] = str(e)
    out["after_failures"] = [mgr.steps(), hidden(run) if rank == 0 else []]  # rank 0 removed them before raising

    for step in (3, 4):
        save_step(mgr, step, rank)
    out["steps4"] = mgr.steps()  # keep_last=2: rank 0 deleted step 1 after step 4's commit

    def reject_4_on_rank_1(m: layout.Manifest, loaded: dict, where: str) -> None:
        if rank == 1 and m.step == 4:
            raise FormatError(f"{where}: damaged as rank 1 sees it")

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        found = latest_intact(run, naming=NAMING, check=reject_4_on_rank_1, comm=mgr.comm)
        alone = latest_intact(run, naming=NAMING, check=reject_4_on_rank_1)  # each on its own: they differ
    assert found is not None and alone is not None
    out["resume"] = [found.step, alone.step, sorted(found.loaded)]
    out["warned"] = [str(w.message) for w in seen]
    mgr.close()

    with stage(os.path.join(data, "explicit"), 7, comm=Comm()) as st:  # without a manager
        st.write(f"part_{rank}.tk", {"r": torch.tensor([rank])})
    out["explicit"] = sorted(layout.read_manifest(os.path.join(data, "explicit")).files)


def scenario_kill(rank: int, world: int, data: str, out: dict) -> None:
    """Step 1 committed; rank VICTIM (DATA_DIR/victim) is SIGKILLed while it writes step 2: in the middle
    of its RNG file's tensor (after rank 0's staging marker)."""
    with open(os.path.join(data, "victim")) as f:
        victim = int(f.read())
    mgr = tk.CheckpointManager(os.path.join(data, "run"), naming=NAMING)
    save_step(mgr, 1, rank)
    ranks.save(out, rank)
    real = _io.pwrite_all
    if rank == victim:
        _io.pwrite_all = ranks.failing_write(2000, "sigkill")
    try:
        with mgr.stage(2) as st:
            put(os.path.join(st.path, f"extra_{rank}.json"), "{}")
            st.write(f"rng_state_{rank}.tk", {"w": torch.zeros(1000)})
    except tk.SaveError as e:
        out["killed"] = str(e)
    finally:
        _io.pwrite_all = real
    out["steps"] = mgr.steps()


if __name__ == "__main__":
    ranks.worker_main({"stage": scenario_stage, "kill": scenario_kill})
