"""CheckpointManager with torch.distributed: real gloo ranks (tests/ckpt_dist_worker.py).

Two process scenarios, once each, sharing a directory: "four" (4 ranks) saves a run with
keep_last=2, restores it in place, fails saves in every way and is SIGKILLed in its last save
(rank 0); "two" (2 ranks) restarts on that run, resharding, and saves. This process then restores
the run without any process group.
"""

import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch

import ranks
import tensorkeep as tk
from support import script
from tensorkeep.checkpoint import collective

WORKER = script("ckpt_dist_worker.py")
SCENARIO_TIMEOUT_S = 90  # each collective also times out after 30 s (init_process_group in the worker)


def run_ranks(scenario, world, data, exits=None):
    return ranks.run(WORKER, scenario, world, data, exits, SCENARIO_TIMEOUT_S)


def damage_tensor(path, key):
    """Flip one bit in the data of tensor ``key`` of a tensorkeep file (its header stays intact)."""
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        start = json.loads(f.read(n))[key]["data_offsets"][0]
        f.seek(8 + n + start)
        byte = f.read(1)[0]
        f.seek(8 + n + start)
        f.write(bytes([byte ^ 0x10]))


def _hidden(d):
    return sorted(n for n in os.listdir(d) if ".tk-tmp-" in n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ckdist"))


@pytest.fixture(scope="module")
def ran_four(data):
    return run_ranks("four", 4, data, exits={0: -9})  # rank 0 SIGKILLs itself in its last save


@pytest.fixture(scope="module")
def after_kill(data, ran_four):
    """The run as rank 0's death left it, and a copy whose newest checkpoint is damaged in rank 3's share."""
    run = os.path.join(data, "run")
    left = _hidden(run)
    shutil.copytree(run, os.path.join(data, "damaged"))
    damage_tensor(os.path.join(data, "damaged", "step_00000005", "rank-00003-of-00004.tk"), "table")
    return left


@pytest.fixture(scope="module")
def ran_two(data, after_kill):
    lin = torch.nn.Linear(4, 4)  # a one-file checkpoint saved by one process, for the 2 ranks to restore
    with torch.no_grad():
        lin.weight.fill_(3.0)
    with tk.CheckpointManager(os.path.join(data, "one-file"), one_file=True) as mgr:
        mgr.save(3, {"lin": lin, "note": "three"})
    return run_ranks("two", 2, data)


@pytest.mark.slow
def test_four_ranks_save_retain_and_restore_their_own_rng(ran_four):
    for r in ran_four:
        assert r["steps"] == [[1], [1, 2], [2, 3], [3, 4]]  # keep_last=2, applied by rank 0, seen by all
        assert r["best"] == 4 and r["metrics3"]["rank"] == 0  # rank 0's metrics on every rank
        assert r["metrics3"]["loss"] != r["metrics3"]["loss"]  # NaN went through the ranks' JSON
        assert r["draws4_again"] == r["draws4"]  # each rank's own RNG streams, rewound
    assert len({json.dumps(r["draws4"]) for r in ran_four}) == 4  # the ranks' streams differ


@pytest.mark.slow
def test_every_failure_reaches_every_rank_and_commits_nothing(ran_four):
    for r in ran_four:
        assert "checkpoint step 5" in r["enospc"] and "failed on rank 2 of 4" in r["enospc"]
        assert "No space left on device" in r["enospc"] and "Nothing was committed" in r["enospc"]
        assert r["steps_after_enospc"] == [3, 4]
        assert "failed on rank 3 of 4: TypeError: cannot save obj['odd']" in r["unsupported"]
        assert "with different steps, [5, 6, 5, 5] by rank" in r["other_step"]
        assert "is already open by another CheckpointManager" in r["locked"]
        assert r["due"] is True  # only rank 1's clock said so: every rank saves
        assert r["preempted"] == [True, True]  # SIGTERM reached rank 2 only
        assert r["steps_final"] == [4, 5]
    assert ran_four[0]["hidden_after_enospc"] == []  # rank 0 removed the temporary directory


@pytest.mark.slow
def test_a_killed_rank_commits_nothing(data, ran_four, after_kill):
    for r in ran_four[1:]:
        assert "lost contact with the other ranks" in r["killed"] and "Nothing was committed" in r["killed"]
    assert len(after_kill) == 1 and after_kill[0].startswith(".step_00000006.tk-tmp-")  # never a checkpoint
    assert [c.step for c in tk.list_checkpoints(os.path.join(data, "damaged")) if c.ok] == [4, 5]


@pytest.mark.slow
def test_two_ranks_restart_resharded(ran_two):
    for r in ran_two:
        assert r["damaged_restore"] == 4  # step 5 broke only on rank 1: both ranks took step 4
        assert r["optimizer_state_sharded"]  # a fresh FSDP2 optimizer got DTensor state
        assert r["restored"] == 5 and r["steps"] == [4, 5] and r["steps_after_save"] == [5, 6]
        assert r["rng_kept"]  # saved by 4 ranks, restored on 2: RNG states left alone
        assert "async_save=True is not supported with torch.distributed" in r["async"]
    w0 = ran_two[0]["warnings"]
    assert any("removing the leftovers of an unfinished save" in w and ".step_00000006" in w for w in w0)
    assert any("saved by 4 ranks, this run has 2: the RNG states are not restored" in w for w in w0)
    assert any(
        "skipping damaged checkpoint" in w and "rank 1: ChecksumError" in w for w in ran_two[0]["damaged_warnings"]
    )
    assert ran_two[1]["warnings"] == []  # rank 0 speaks for the group


@pytest.mark.slow
def test_one_process_restores_what_several_ranks_saved(data, ran_four, ran_two):
    from ckpt_dist_worker import build, differences, draws, whole

    run = os.path.join(data, "run")
    assert _hidden(run) == []
    state = build(None)
    with tk.CheckpointManager(run) as mgr:
        assert mgr.steps() == [5, 6]
        assert mgr.restore(state) == 6  # saved by 2 ranks
        assert differences(whole(state), tk.load(os.path.join(data, "expect-6.tk"))) == []
        assert mgr.restore(state, step=5) == 5  # saved by 4 ranks
        assert differences(whole(state), tk.load(os.path.join(data, "expect-5.tk"))) == []
        assert draws() == ran_four[0]["draws5"]  # one process continues as rank 0
    checkpoints = tk.list_checkpoints(run, verify=True)
    assert [(c.step, c.status) for c in checkpoints] == [(5, "ok"), (6, "ok")]
    m = tk.checkpoint.layout.read_manifest(os.path.join(run, "step_00000005"))
    kinds = {n: i["kind"] for n, i in m.files.items()}
    assert kinds == {
        **{f"rank-0000{r}-of-00004.tk": "distributed" for r in range(4)},
        "distributed.json": "distributed",
        **{f"rng-0000{r}.tk": "rng-rank" for r in range(4)},
    }
    assert m.files["distributed.json"]["keys"]["table"] == "values"
    back = tk.load(os.path.join(run, "step_00000005"))  # a checkpoint is a save_distributed directory too
    assert back["epoch"] == 5 and torch.equal(back["table"], tk.load(os.path.join(data, "expect-5.tk"))["table"])


def test_without_a_process_group_nothing_is_collective(tmp):
    assert collective.join(tmp, async_save=True, incremental=False, local=True) is None
    with tk.CheckpointManager(tmp, async_save=True) as mgr:  # one process: async saves as before
        mgr.save(1, {"x": np.arange(3)})
    assert tk.CheckpointManager(tmp).restore({"x": None}) == 1


def test_ranks_restore_a_one_file_checkpoint_saved_by_one_process(ran_two):
    for r in ran_two:  # every rank: the step, the module, the plain value (RNG states: each keeps its own)
        assert r["one_file"] == [3, True, "three"], r["one_file"]
