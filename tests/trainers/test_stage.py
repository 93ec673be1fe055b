"""The staged-commit API (tensorkeep.checkpoint.stage): other code writes into a checkpoint, which
appears only when complete; run naming; kind "file" entries verified whole; latest_intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import tensorkeep as tk
from tensorkeep.checkpoint import layout
from tensorkeep.checkpoint.intact import latest_intact
from tensorkeep.checkpoint.naming import Naming
from tensorkeep.checkpoint.stage import Stage, stage
from tensorkeep.errors import CheckpointNotFoundError, SaveError
from tensorkeep.verification import verify


def _flip(path: str, offset: int = -1) -> None:
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


def _put(path: str, data: str | bytes) -> None:
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _entries(run: str) -> list[str]:
    return sorted(n for n in os.listdir(run) if n != ".tensorkeep.lock")


def test_stage_records_foreign_files_and_publishes_atomically(tmp):
    with tk.CheckpointManager(tmp, naming="checkpoint-{step}") as mgr:
        with mgr.stage(7, metrics={"loss": 0.5}) as st:
            st.write("optimizer.tk", {"lr": 0.1, "m": torch.arange(4.0)}, key="optimizer", kind="state_dict")
            with open(os.path.join(st.path, "config.json"), "w") as f:
                f.write('{"hidden": 4}')
            assert st.path.startswith(os.path.join(tmp, ".checkpoint-7.tk-tmp-"))
            assert _entries(tmp) == [os.path.basename(st.path)]  # nothing published yet
            assert sorted(os.listdir(st.path)) == [layout.STAGING_MARKER, "config.json", "optimizer.tk"]
        assert _entries(tmp) == ["checkpoint-7"]
        d = mgr.path(7)
        assert sorted(os.listdir(d)) == ["config.json", "manifest.json", "optimizer.tk"]  # no marker left
        m = layout.read_manifest(d)
        assert m.files["config.json"] == {
            "size": 13,
            "crc32": layout.file_crc(os.path.join(d, "config.json"))[1],
            "key": "",
            "kind": "file",
        }
        assert m.files["optimizer.tk"]["kind"] == "state_dict" and m.metrics == {"loss": 0.5}
        assert mgr.steps() == [7] and mgr.metrics(7) == {"loss": 0.5}
    found = latest_intact(tmp, naming="checkpoint-{step}")
    assert found is not None and found.step == 7 and found.path == d
    assert set(found.loaded) == {"optimizer.tk"}  # the foreign file is checked whole, not loaded
    assert torch.equal(found.loaded["optimizer.tk"]["m"], torch.arange(4.0))
    assert verify(tmp).ok and verify(d).checked_files == 2


def test_exception_publishes_nothing_and_removes_the_temp_dir_whole(tmp):
    with tk.CheckpointManager(tmp, naming="checkpoint_{step}", keep_last=1) as mgr:
        with mgr.stage(1) as st:
            st.write("a.tk", {"x": torch.ones(2)})
        with pytest.raises(RuntimeError, match="boom"):
            with mgr.stage(2) as st:
                _put(os.path.join(st.path, "weights.bin"), b"\0" * 10)
                raise RuntimeError("boom")
        assert _entries(tmp) == ["checkpoint_1"]  # the foreign file went with its temp dir
        assert mgr.steps() == [1]


def test_subdir_for_code_that_appends_the_name_itself(tmp):
    with tk.CheckpointManager(tmp, naming="checkpoint-{step}") as mgr:
        with mgr.stage(3, subdir="checkpoint-3") as st:
            assert st.path == os.path.join(st.run_path, "checkpoint-3")
            os.makedirs(st.path, exist_ok=True)  # what a trainer's save does
            _put(os.path.join(st.path, "model.safetensors"), b"weights")
            _put(os.path.join(st.run_path, "runs.log"), "beside it")  # not published
        assert _entries(tmp) == ["checkpoint-3"]
        assert sorted(os.listdir(mgr.path(3))) == ["manifest.json", "model.safetensors"]


def test_only_files_and_no_manifest_name(tmp):
    with tk.CheckpointManager(tmp) as mgr:
        with pytest.raises(SaveError, match="only regular files"):
            with mgr.stage(1) as st:
                os.mkdir(os.path.join(st.path, "sub"))
                _put(os.path.join(st.path, "sub", "x"), "x")
        with pytest.raises(SaveError, match="named like tensorkeep's manifest"):
            with mgr.stage(1) as st:
                _put(os.path.join(st.path, "manifest.json"), "{}")
        assert _entries(tmp) == [] and mgr.steps() == []
        with pytest.raises(ValueError, match="free plain file name"):
            with mgr.stage(1) as st:
                st.write("../x.tk", {"a": 1})


def test_retention_runs_after_the_commit_and_deletes_foreign_listed_files(tmp):
    with tk.CheckpointManager(tmp, naming="checkpoint-{step}", keep_last=1) as mgr:
        for s in (1, 2):
            with mgr.stage(s) as st:
                _put(os.path.join(st.path, "tokenizer.json"), f"tok {s}")
                assert mgr.steps() == list(range(1, s))  # the previous one is still there during the save
        assert _entries(tmp) == ["checkpoint-2"] and mgr.steps() == [2]


def test_damaged_foreign_file_falls_back_with_a_warning(tmp):
    with tk.CheckpointManager(tmp, naming="checkpoint-{step}") as mgr:
        for s in (1, 2):
            with mgr.stage(s) as st:
                st.write("values.tk", {"step": s}, kind="values")
                _put(os.path.join(st.path, "extra.bin"), bytes(range(200)))
    _flip(os.path.join(tmp, "checkpoint-2", "extra.bin"), 100)  # same size: only the CRC can tell
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*checkpoint-2.*extra.bin .*CRC-32"):
        found = latest_intact(tmp, naming="checkpoint-{step}")
    assert found is not None and found.step == 1
    res = verify(tmp)
    assert not res.ok and "extra.bin" in str(res.problems[0])
    assert [c.status[:7] for c in tk.list_checkpoints(tmp, naming="checkpoint-{step}")] == ["ok", "damaged"]
    with tk.CheckpointManager(tmp, naming="checkpoint-{step}") as mgr:
        state: dict = {"step": 0}
        with pytest.warns(UserWarning, match="skipping damaged"):
            assert mgr.restore(state) == 1
        assert state["step"] == 1
        with pytest.raises(CheckpointNotFoundError, match="extra.bin"):
            mgr.restore(state, step=2)


def test_naming(tmp):
    with pytest.raises(ValueError, match="exactly one field"):
        tk.CheckpointManager(tmp, naming="checkpoint")
    with pytest.raises(ValueError, match="incremental"):
        tk.CheckpointManager(tmp, naming="ck-{step}", incremental=True)
    n = Naming("checkpoint-{step}")
    assert (n.step_of("checkpoint-10"), n.step_of("checkpoint-010"), n.step_of("checkpoint-1x")) == (10, None, None)
    with tk.CheckpointManager(tmp, naming="ck-{step}", keep_last=2) as mgr:
        net = torch.nn.Linear(2, 2)
        for s in (1, 2, 3):
            mgr.save(s, {"model": net})
        assert _entries(tmp) == ["ck-2", "ck-3"]
    os.mkdir(os.path.join(tmp, "ck-9"))  # named like a checkpoint, no manifest: ignored, never deleted
    with pytest.warns(UserWarning, match="ck-9 is named like a checkpoint"):
        with tk.CheckpointManager(tmp, naming="ck-{step}") as mgr:
            assert mgr.steps() == [2, 3]
    with tk.CheckpointManager(os.path.join(tmp, "default")) as mgr:  # the default is unchanged
        mgr.save(5, {"x": 1})
        assert os.path.basename(mgr.path(5)) == "step_00000005"


_KILLED_STAGE = """
import os, signal, sys, torch, tensorkeep as tk
mgr = tk.CheckpointManager(sys.argv[1], naming="checkpoint-{step}")
with mgr.stage(1) as st:
    st.write("a.tk", {"x": torch.ones(3)})
with mgr.stage(2) as st:
    st.write("a.tk", {"x": torch.zeros(3)})
    open(os.path.join(st.path, "foreign.bin"), "wb").close()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill9_mid_stage_leftover_is_removed_whole_on_open(tmp):
    p = subprocess.run([sys.executable, "-c", _KILLED_STAGE, tmp], capture_output=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
    left = [n for n in _entries(tmp) if n.startswith(".checkpoint-2.tk-tmp-")]
    assert len(left) == 1 and "foreign.bin" in os.listdir(os.path.join(tmp, left[0]))
    res = verify(tmp)  # an unfinished save is a note, not damage
    assert res.ok and any("an unfinished save" in n for n in res.notes), res
    assert latest_intact(tmp, naming="checkpoint-{step}").step == 1  # reading changes nothing
    with pytest.warns(UserWarning, match="removing the leftovers of an unfinished save"):
        with tk.CheckpointManager(tmp, naming="checkpoint-{step}") as mgr:
            assert mgr.steps() == [1]
    assert _entries(tmp) == ["checkpoint-1"]


def test_unmarked_temp_dir_keeps_what_tensorkeep_did_not_write(tmp):
    d = os.path.join(tmp, f".checkpoint-4.tk-tmp-{os.getpid()}-0a1b2c3d")
    os.makedirs(d)
    _put(os.path.join(d, "user.txt"), "mine")
    _put(os.path.join(d, "a.tk"), "partial")
    _put(os.path.join(d, layout.STAGING_MARKER), "not json")  # a marker must be the real one to remove all
    with pytest.warns(UserWarning) as seen:
        tk.CheckpointManager(tmp, naming="checkpoint-{step}").close()
    assert "which tensorkeep did not write" in str(seen[-1].message)
    assert sorted(os.listdir(d)) == ["user.txt"]  # a torn marker is a name of ours: it goes, user.txt stays


def test_standalone_stage_replaces_only_a_tensorkeep_checkpoint(tmp):
    final = os.path.join(tmp, "out", "ckpt")
    for v in (1.0, 2.0):
        with stage(final, 0) as st:
            st.write("w.tk", {"w": torch.full((2,), v)})
            _put(os.path.join(st.path, "notes.txt"), str(v))
    assert tk.load(os.path.join(final, "w.tk"))["w"].tolist() == [2.0, 2.0]
    assert sorted(os.listdir(os.path.dirname(final))) == ["ckpt"]
    foreign = os.path.join(tmp, "theirs")
    os.mkdir(foreign)
    with pytest.raises(SaveError, match="not a checkpoint"):
        with stage(foreign, 0):
            raise AssertionError("not reached: refused before the block")
    assert sorted(os.listdir(tmp)) == ["out", "theirs"] and os.listdir(foreign) == []


def test_standalone_stage_removes_a_dead_process_leftover(tmp):
    final = os.path.join(tmp, "ckpt")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    time.sleep(0.05)
    d = os.path.join(tmp, f".ckpt.tk-tmp-{pid}-0a1b2c3d")
    os.mkdir(d)
    with open(os.path.join(d, layout.STAGING_MARKER), "w") as f:
        json.dump({"format": layout.STAGING_FORMAT, "by": "test"}, f)
    _put(os.path.join(d, "foreign.bin"), b"x")
    with pytest.warns(UserWarning, match="removing the leftovers"):
        with stage(final, 1) as st:
            st.write("v.tk", {"a": 1})
    assert sorted(os.listdir(tmp)) == ["ckpt"]


def test_deferred_stage_writes_later_and_publishes_only_through_finish(tmp):
    """Stage(defer=True), the base of the integrations' async_save: write() checks and records, the
    block publishes nothing, finish() writes what it is given and commits; an error in the block or
    in finish() publishes nothing and removes the temporary directory; abandon() drops it."""
    final = os.path.join(tmp, "ckpt")
    st = stage(final, 1, defer=True)
    with st:
        assert st.write("w.tk", {"w": torch.ones(3)}).startswith(st.path)
        with open(os.path.join(st.path, "notes.txt"), "w") as f:
            f.write("hi")
        with pytest.raises(TypeError, match="not supported"):
            st.write("bad.tk", {"f": print})  # refused now, on the caller's thread
        assert not os.path.exists(os.path.join(st.path, "w.tk"))
    assert not os.path.exists(final) and set(st.deferred) == {"w.tk"}
    st.finish({"w.tk": {"w": torch.full((3,), 2.0)}})  # what the owner snapshotted
    assert tk.load(os.path.join(final, "w.tk"))["w"].tolist() == [2.0, 2.0, 2.0]
    assert set(layout.read_manifest(final).files) == {"w.tk", "notes.txt"} and verify(final).ok
    with pytest.raises(tk.TensorkeepError, match="only once"):
        st.finish({"w.tk": {}})

    later = stage(os.path.join(tmp, "later"), 2, defer=True)
    with later:
        later.write("w.tk", {"w": torch.ones(1)})
    with pytest.raises(KeyError):
        later.finish({})  # the owner lost an object: nothing published, temporary directory removed
    assert os.listdir(tmp) == ["ckpt"]
    dropped = stage(os.path.join(tmp, "dropped"), 3, defer=True)
    with dropped:
        dropped.write("w.tk", {"w": torch.ones(1)})
    dropped.abandon()
    with pytest.raises(RuntimeError, match="boom"), stage(os.path.join(tmp, "raised"), 4, defer=True) as st4:
        st4.write("w.tk", {"w": torch.ones(1)})
        raise RuntimeError("boom")
    assert os.listdir(tmp) == ["ckpt"]
    with pytest.raises(ValueError, match="defer=True"), tk.CheckpointManager(os.path.join(tmp, "sync-run")) as mgr:
        with mgr.stage(1, defer=True):
            pass


def test_deferred_stage_takes_metrics_and_refusals_at_the_call(tmp, monkeypatch):
    """What a synchronous stage would take or refuse at the call, a deferred one does too: metrics as
    they are when the block ends (a tensor updated in place later does not reach the manifest), and a
    dtype the writer refuses raised by write(), not later by the writer thread."""
    go, real = threading.Event(), Stage.finish
    monkeypatch.setattr(Stage, "finish", lambda self, objs: go.wait(30) and real(self, objs))
    loss = torch.tensor(0.25)
    with tk.CheckpointManager(os.path.join(tmp, "run"), async_save=True, keep_best=("loss", "min")) as mgr:
        with mgr.stage(1, defer=True, metrics={"loss": loss}) as st:
            st.write("w.tk", {"w": torch.ones(2)})
            with pytest.raises(TypeError):
                st.write("odd.tk", {"x": np.zeros(2, np.longdouble)})
        loss.fill_(9.0)  # after the block, before the writer publishes: the manifest keeps 0.25
        go.set()
        mgr.wait()
        assert mgr.metrics(1) == {"loss": 0.25} and layout.read_manifest(mgr.path(1)).metrics == {"loss": 0.25}
