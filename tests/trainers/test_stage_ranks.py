"""The staged-commit API across torch.distributed ranks: real gloo processes (tests/trainers/stage_worker.py).

Every rank writes its own files into rank 0's temporary directory; rank 0 commits once all of them are
durable; a failure or a SIGKILL on any rank publishes nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

import ranks
import tensorkeep as tk
from tensorkeep.checkpoint import layout
from tensorkeep.checkpoint.intact import latest_intact
from tensorkeep.verification import verify

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stage_worker.py")
NAMING = "checkpoint-{step}"
TIMEOUT_S = 120  # each collective also gives up after 30 s (init_process_group in ranks.worker_main)


def test_two_ranks_commit_one_checkpoint_with_every_rank_s_files(tmp):
    r0, r1 = ranks.run(WORKER, "stage", 2, tmp, timeout_s=TIMEOUT_S)
    assert r0["path"] == r1["path"] and os.path.basename(r0["path"]).startswith(".checkpoint-1.tk-tmp-")
    for r in (r0, r1):
        assert r["committed_on_return"]  # neither rank returned before the commit
        assert r["files"] == [
            "config.json",
            "extra_0.json",
            "extra_1.json",
            "model.tk",
            "rng_state_0.tk",
            "rng_state_1.tk",
        ]
        assert r["listing"] == sorted(r["files"] + ["manifest.json"])  # no staging marker left
        assert r["steps1"] == [1] and r["metrics1"] == {"loss": 0.5, "rank": 0}
        assert (
            "checkpoint step 2: writing its files failed on rank 1 of 2: RuntimeError: injected on rank 1"
            in r["failed"]
        )
        assert "Nothing was published" in r["failed"]
        assert "failed on rank 1 of 2" in r["enospc"] and "No space left on device" in r["enospc"]
        assert "same.tk: creating a temporary file failed: File exists" in r["clash"]  # one rank's st.write
        assert r["after_failures"] == [[1], []]  # nothing published, every temporary directory removed
        assert r["steps4"] == [3, 4]
        assert r["resume"][0] == 3 and r["resume"][2] == ["model.tk", "rng_state_0.tk", "rng_state_1.tk"]
        assert r["explicit"] == ["part_0.tk", "part_1.tk"]
    assert r1["cause"] == "RuntimeError"
    assert r1["resume"][1] == 3 and r0["resume"][1] == 4  # alone, the ranks would disagree
    assert any("skipping damaged checkpoint" in w and "rank 1" in w for w in r0["warned"])
    run = os.path.join(tmp, "run")
    assert sorted(n for n in os.listdir(run) if n != ".tensorkeep.lock") == ["checkpoint-3", "checkpoint-4"]
    assert verify(run).ok
    found = latest_intact(run, naming=NAMING)  # one process reads what two ranks wrote
    assert (
        found is not None
        and found.step == 4
        and layout.read_manifest(found.path).files["config.json"]["kind"] == "file"
    )


@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_killed_mid_stage_publishes_nothing(tmp, victim):
    """Rank 1 killed: rank 0 must not publish and removes the temporary directory. Rank 0 killed: its
    temporary directory stays until the run is next opened."""
    with open(os.path.join(tmp, "victim"), "w") as f:
        f.write(str(victim))
    survivor = ranks.run(WORKER, "kill", 2, tmp, exits={victim: -9}, timeout_s=TIMEOUT_S)[1 - victim]
    assert "lost contact with the other ranks" in survivor["killed"] and "Nothing was published" in survivor["killed"]
    assert survivor["steps"] == [1]
    run = os.path.join(tmp, "run")
    left = [n for n in os.listdir(run) if n.startswith(".checkpoint-2.")]
    assert len(left) == int(victim == 0)  # rank 0 alive: it removed it; rank 0 dead: left for the next open
    assert "checkpoint-2" not in os.listdir(run)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with tk.CheckpointManager(run, naming=NAMING) as mgr:
            assert mgr.steps() == [1]
    assert [n for n in os.listdir(run) if n.startswith(".checkpoint")] == []
    assert any("removing the leftovers of an unfinished save" in str(w.message) for w in seen) == bool(victim == 0)
    found = latest_intact(run, naming=NAMING)
    assert found is not None and found.step == 1 and verify(run).ok
    assert sorted(found.loaded) == ["model.tk", "rng_state_0.tk", "rng_state_1.tk"]


def test_a_kill_while_the_staging_marker_is_written_leaves_nothing_unremovable(tmp):
    """The marker is renamed into place whole: a kill in the middle of it leaves a temporary name, which
    the next open removes with its directory (a torn marker would prove nothing, and the directory stay)."""
    code = (
        "import sys, ranks, tensorkeep as tk\n"
        "from tensorkeep.storage import local as _io\n"
        "mgr = tk.CheckpointManager(sys.argv[1], naming='checkpoint-{step}')\n"
        "_io.pwrite_all = ranks.failing_write(40, 'sigkill')\n"
        "with mgr.stage(1) as st: pass\n"
    )
    run = os.path.join(tmp, "run")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(ranks.__file__), os.environ.get("PYTHONPATH", "")])
    )
    p = subprocess.run([sys.executable, "-c", code, run], env=env, capture_output=True, timeout=120)
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    (left,) = [n for n in os.listdir(run) if n.startswith(".checkpoint-1.")]
    assert [n.startswith("..tk-staging.json.tk-tmp-") for n in os.listdir(os.path.join(run, left))] == [True]
    with pytest.warns(UserWarning, match="removing the leftovers of an unfinished save"):
        tk.CheckpointManager(run, naming=NAMING).close()
    assert [n for n in os.listdir(run) if n != ".tensorkeep.lock"] == []
