"""CheckpointManager: save/restore, retention, damaged checkpoints, locks, intervals."""

import json
import os
import random
import shutil
import warnings

import numpy as np
import pytest
import torch

import tensorkeep as tk
from tensorkeep.checkpoint import BestN, EveryNSteps, LatestN, Record, layout
from tensorkeep.checkpoint.policies import to_keep
from tensorkeep.core.format import dumps, seal


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))


def _state():
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    return {"model": m, "optimizer": opt, "scheduler": sched, "epoch": 0, "best": torch.tensor(1.0)}


def _train(state, n=3):
    m, opt = state["model"], state["optimizer"]
    for _ in range(n):
        opt.zero_grad()
        m(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        state["scheduler"].step()


# ---------------------------------------------------------------- retention as tables

RECS = [Record(s, {"loss": l}) for s, l in [(100, 0.9), (200, 0.5), (300, 0.7), (400, 0.2), (500, 0.6), (1000, 0.8)]]


@pytest.mark.parametrize(
    "policies,keep",
    [
        ([LatestN(2)], {500, 1000}),
        ([LatestN(1)], {1000}),
        ([BestN("loss", "min", 1)], {400, 1000}),
        ([BestN("loss", "max", 2)], {100, 1000}),
        ([EveryNSteps(200)], {200, 400, 1000}),
        ([LatestN(1), BestN("loss", "min", 2), EveryNSteps(1000)], {200, 400, 1000}),
        ([], {1000}),
    ],
)
def test_policy_table(policies, keep):
    assert to_keep(RECS, policies) == keep


def test_best_ignores_missing_and_nan():
    recs = [Record(1, {}), Record(2, {"loss": float("nan")}), Record(3, {"loss": 1.0}), Record(4, {"loss": True})]
    assert BestN("loss").keep(recs) == {3}


# ---------------------------------------------------------------- save / restore


@pytest.mark.parametrize("one_file", [False, True], ids=["files", "one-file"])
def test_round_trip_everything(tmp, one_file):
    st = _state()
    _train(st)
    st["epoch"] = 5
    with tk.CheckpointManager(tmp, one_file=one_file) as mgr:
        assert mgr.restore(_state()) is None
        mgr.save(5, st, metrics={"loss": 0.25})
        names = sorted(os.listdir(mgr.path(5)))
        assert names == (
            ["manifest.json", "state.tk"]
            if one_file
            else ["manifest.json", "model.tk", "optimizer.tk", "rng.tk", "scheduler.tk", "values.tk"]
        )
        random.random(), np.random.rand(), torch.rand(1)  # move every RNG after the save
        expect = (random.random(), np.random.rand(), torch.rand(1))
    fresh = _state()
    with tk.CheckpointManager(tmp) as mgr:
        assert mgr.restore(fresh) == 5
        assert (random.random(), np.random.rand(), torch.rand(1)) != expect  # restored: the stream rewound
    for a, b in zip(st["model"].state_dict().values(), fresh["model"].state_dict().values()):
        assert torch.equal(a, b)
    so, fo = st["optimizer"].state_dict(), fresh["optimizer"].state_dict()
    assert so["param_groups"] == fo["param_groups"]
    assert so["state"].keys() == fo["state"].keys() and all(
        torch.equal(so["state"][k]["exp_avg"], fo["state"][k]["exp_avg"]) for k in so["state"]
    )
    assert fresh["scheduler"].state_dict() == st["scheduler"].state_dict()
    assert fresh["epoch"] == 5 and torch.equal(fresh["best"], st["best"])


def test_rng_restored_exactly(tmp):
    st = {"x": 1}
    with tk.CheckpointManager(tmp) as mgr:
        mgr.save(1, st)
        want = (random.random(), np.random.rand(), torch.rand(2))
        random.random(), np.random.rand(), torch.rand(5)
        mgr.restore(st)
        got = (random.random(), np.random.rand(), torch.rand(2))
    assert want[0] == got[0] and want[1] == got[1] and torch.equal(want[2], got[2])


def test_rng_saved_compactly_and_old_checkpoints_still_restore(tmp):
    """Python's Mersenne state is kept as one uint32 array; checkpoints written before that
    (a 625-element list in rng.tk) restore the same stream."""
    random.seed(7)
    random.gauss(0, 1)  # leaves a cached gaussian in the state
    with tk.CheckpointManager(tmp) as mgr:
        mgr.save(1, {"x": 1})
        rng_file = os.path.join(mgr.path(1), "rng.tk")
        version, internal, gauss = tk.load(rng_file)["python"]
        assert isinstance(internal, np.ndarray) and internal.dtype == np.uint32 and internal.shape == (625,)
        want = [random.random(), random.gauss(0, 1)]
        old = dict(tk.load(rng_file), python=(version, internal.tolist(), gauss))  # the earlier layout
        from tensorkeep.checkpoint import rng

        rng.restore(old)
        assert [random.random(), random.gauss(0, 1)] == want


def test_retention_and_queries(tmp):
    with tk.CheckpointManager(tmp, keep_last=2, keep_best=("loss", "min"), keep_every=300) as mgr:
        for s, l in [(100, 0.9), (200, 0.1), (300, 0.7), (400, 0.8), (500, 0.6)]:
            mgr.save(s, {"v": s}, metrics={"loss": l})
        assert mgr.steps() == [200, 300, 400, 500]
        assert mgr.best_step() == 200 and mgr.latest_step() == 500
        assert mgr.metrics(300) == {"loss": 0.7}
    assert layout.list_steps(tmp) == [200, 300, 400, 500]


def test_roll_back_to_kept_step(tmp):
    st = {"w": torch.zeros(3)}
    with tk.CheckpointManager(tmp) as mgr:
        for s in (1, 2, 3):
            st["w"] = torch.full((3,), float(s))
            mgr.save(s, st)
        w = st["w"]
        assert mgr.restore(st, step=2) == 2
        assert st["w"] is w and torch.equal(w, torch.full((3,), 2.0))  # tensors restored in place


def test_restore_missing_step_lists_existing(tmp):
    with tk.CheckpointManager(tmp) as mgr:
        mgr.save(10, {"a": 1})
        mgr.save(20, {"a": 2})
        with pytest.raises(tk.CheckpointNotFoundError, match=r"Steps that exist: \[10, 20\]"):
            mgr.restore({"a": 0}, step=15)


def _data_file(d):
    return os.path.join(d, "state.tk" if os.path.exists(os.path.join(d, "state.tk")) else "model.tk")


def _corrupt_truncate(d):
    p = _data_file(d)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 7)


def _corrupt_flip(d):
    p = _data_file(d)
    data = bytearray(open(p, "rb").read())
    data[-5] ^= 0x04
    open(p, "wb").write(data)


def _corrupt_manifest_missing(d):
    os.unlink(os.path.join(d, "manifest.json"))


def _corrupt_manifest_garbage(d):
    open(os.path.join(d, "manifest.json"), "w").write('{"format": "tensorkeep-checkpoint", "version": 1, "step": NaN}')


@pytest.mark.parametrize("one_file", [False, True], ids=["files", "one-file"])
@pytest.mark.parametrize(
    "damage", [_corrupt_truncate, _corrupt_flip, _corrupt_manifest_missing, _corrupt_manifest_garbage]
)
def test_damaged_newest_falls_back(tmp, damage, one_file):
    st = _state()
    with tk.CheckpointManager(tmp, one_file=one_file) as mgr:
        mgr.save(1, st)
        want = {k: v.clone() for k, v in st["model"].state_dict().items()}
        _train(st)
        mgr.save(2, st)
    damage(layout.step_dir(tmp, 2))
    fresh = _state()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with tk.CheckpointManager(tmp) as mgr:
            assert mgr.restore(fresh) == 1
            if damage is not _corrupt_manifest_missing:
                with pytest.raises(tk.CheckpointNotFoundError, match=r"step 2.*Steps that exist"):
                    mgr.restore(_state(), step=2)
    assert any("step_00000002" in str(x.message) for x in w)
    for k, v in fresh["model"].state_dict().items():
        assert torch.equal(v, want[k])


def test_leftovers_of_crashed_save_are_cleaned(tmp):
    with tk.CheckpointManager(tmp) as mgr:
        mgr.save(1, {"a": 1})
    junk = os.path.join(tmp, ".step_00000002.tk-tmp-999-abcd0123")  # tensorkeep's own temporary name
    os.makedirs(junk)
    open(os.path.join(junk, "model.tk"), "wb").write(b"partial")
    half = layout.step_dir(tmp, 3)
    os.makedirs(half)  # named like a step, but no manifest: not provably ours, so only warned about
    open(os.path.join(half, "notes.txt"), "w").write("mine")
    with pytest.warns(UserWarning) as caught:
        with tk.CheckpointManager(tmp) as mgr:
            assert mgr.steps() == [1]
    said = " ".join(str(w.message) for w in caught)
    assert "leftovers" in said and "never deletes it" in said
    assert sorted(os.listdir(tmp)) == ["step_00000001", "step_00000003"]
    assert open(os.path.join(half, "notes.txt")).read() == "mine"


def test_failed_save_leaves_committed_intact(tmp, monkeypatch):
    import errno

    from tensorkeep.storage import local as _io

    with tk.CheckpointManager(tmp) as mgr:
        mgr.save(1, {"w": torch.ones(10)})
        real = _io.pwrite_all
        calls = {"n": 0}

        def failing(fd, buf, off):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, buf, off)

        monkeypatch.setattr(_io, "pwrite_all", failing)
        with pytest.raises(tk.SaveError, match=r"step 2 was not saved.*No space left.*intact"):
            mgr.save(2, {"w": torch.zeros(10)})
        monkeypatch.undo()
        assert mgr.steps() == [1]
        st = {"w": torch.zeros(10)}
        assert mgr.restore(st) == 1 and torch.equal(st["w"], torch.ones(10))
    assert sorted(os.listdir(tmp)) == ["step_00000001"]


def test_crash_during_retention_cleanup_loses_nothing(tmp, monkeypatch):
    from tensorkeep.storage import local as _io

    with tk.CheckpointManager(tmp, keep_last=1) as mgr:
        mgr.save(1, {"v": 1})

        def dies_midway(path, names):  # one file deleted, then the power goes
            _io.unlink(os.path.join(path, sorted(names)[0]))
            raise OSError("power cut")

        monkeypatch.setattr(_io, "remove_own_dir", dies_midway)
        with pytest.raises(OSError, match="power cut"):
            mgr.save(2, {"v": 2})  # committed; deleting step 1 died after it was renamed away
        monkeypatch.undo()
    assert [n for n in os.listdir(tmp) if n.startswith(".step_00000001.tk-tmp-")]  # recognizably ours
    with pytest.warns(UserWarning, match="leftovers"):
        with tk.CheckpointManager(tmp, keep_last=1) as mgr:
            st = {"v": 0}
            assert mgr.restore(st) == 2 and st["v"] == 2
            assert mgr.steps() == [2]
    assert sorted(n for n in os.listdir(tmp) if not n.startswith(".tensorkeep")) == ["step_00000002"]


def test_resave_same_step_replaces_it(tmp):
    with tk.CheckpointManager(tmp) as mgr:
        mgr.save(5, {"v": 1})
        mgr.save(5, {"v": 2})
        st = {"v": 0}
        assert mgr.restore(st) == 5 and st["v"] == 2
    assert sorted(os.listdir(tmp)) == ["step_00000005"]


def test_second_manager_refused_and_stale_lock_taken_over(tmp):
    import json
    import subprocess
    import sys

    mgr = tk.CheckpointManager(tmp)
    with pytest.raises(tk.LockedError, match="already open"):
        tk.CheckpointManager(tmp)
    code = f"import tensorkeep as tk\ntry:\n    tk.CheckpointManager({tmp!r})\nexcept tk.LockedError as e:\n    print('LOCKED', e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "LOCKED" in out and f"process {os.getpid()}" in out
    mgr.close()
    # a lock left by a process that died is taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = os.path.join(tmp, ".tensorkeep.lock")
    with open(lock, "w") as f:
        json.dump({"pid": dead.pid, "host": __import__("socket").gethostname()}, f)
    os.utime(lock, (0, 0))
    with tk.CheckpointManager(tmp) as mgr:
        mgr.save(1, {"a": 1})


def test_should_save_intervals(tmp):
    with tk.CheckpointManager(tmp, save_interval_steps=3) as mgr:
        assert [s for s in range(1, 10) if mgr.should_save(s)] == [3, 6, 9]
    with tk.CheckpointManager(tmp, save_interval_seconds=0.0) as mgr:
        assert mgr.should_save(1)
    with tk.CheckpointManager(tmp, save_interval_seconds=3600) as mgr:
        assert not mgr.should_save(1)


def test_model_file_readable_by_load_into(tmp):
    st = _state()
    with tk.CheckpointManager(tmp) as mgr:
        mgr.save(1, st)
        m = _model()
        assert tk.load_into(m, os.path.join(mgr.path(1), "model.tk")).ok


def test_bad_state_and_closed_manager(tmp):
    mgr = tk.CheckpointManager(tmp)
    with pytest.raises(TypeError, match="cannot save obj\\['fn'\\]"):
        mgr.save(1, {"fn": lambda: 0})
    assert mgr.steps() == [] and [f for f in os.listdir(tmp) if "tk-tmp" in f] == []
    mgr.close()
    with pytest.raises(tk.TensorkeepError, match="closed"):
        mgr.save(2, {})


def test_rmtree_of_run_dir_ok(tmp):
    run = os.path.join(tmp, "run")
    with tk.CheckpointManager(run) as mgr:
        mgr.save(1, {"a": 1})
    shutil.rmtree(run)
    with tk.CheckpointManager(run) as mgr:
        assert mgr.restore({"a": 0}) is None


@pytest.mark.parametrize("async_save", [False, True])
def test_durable_false_makes_no_fsync(tmp, fsync_calls, async_save):
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for durable in (True, False):
        run = os.path.join(tmp, f"run-{durable}")
        with tk.CheckpointManager(run, durable=durable, async_save=async_save) as mgr:
            fsync_calls.clear()
            mgr.save(1, {"model": net, "optimizer": opt, "epoch": 1})
            mgr.wait()
            made = list(fsync_calls)
            back = torch.nn.Linear(4, 2)
            assert mgr.restore({"model": back}) == 1 and torch.equal(back.weight, net.weight)
        # durable: every file, the manifest, the new directory and its parent after the rename
        assert made.count("file") == (len(os.listdir(mgr.path(1))) if durable else 0), made
        assert made.count("dir") == (2 if durable else 0), made


def test_one_file_layout_reads_by_part_and_refuses_what_does_not_fit(tmp):
    """one_file=True: one data file whose top-level keys are the parts, a version-3 manifest that
    lists them; a manifest naming a part the file lacks, or malformed, makes the checkpoint damaged."""
    st = _state()
    with tk.CheckpointManager(tmp, one_file=True, keep_last=1) as mgr:
        mgr.save(1, st)
        mgr.save(2, st)
        assert mgr.steps() == [2]
        d = mgr.path(2)
    parts = tk.load(os.path.join(d, "state.tk"))
    assert sorted(parts) == ["model", "optimizer", "rng", "scheduler", "values"]
    assert all(torch.equal(v, st["model"].state_dict()[k]) for k, v in parts["model"].items())
    m = layout.read_manifest(d)
    assert m.bundled["model.tk"] == {"key": "model", "kind": "state_dict"} and list(m.files) == ["state.tk"]
    with tk.CheckpointManager(tmp) as mgr:  # restore reads either layout
        assert mgr.restore(_state()) == 2

    def rewrite(change):
        raw = json.loads(open(os.path.join(d, "manifest.json"), "rb").read())
        change(raw)
        raw.pop("crc32", None)
        with open(os.path.join(d, "manifest.json"), "wb") as f:
            f.write(seal(dumps(raw)))

    rewrite(lambda raw: raw["bundled"].update({"extra.tk": {"key": "extra", "kind": "state_dict"}}))
    with tk.CheckpointManager(tmp) as mgr, pytest.warns(UserWarning, match="damaged"):
        assert mgr.restore(_state()) is None  # the file holds no part "extra"
    for bad in ({"model": {}}, {"model.tk": {"key": 1, "kind": "state_dict"}}, {}):
        rewrite(lambda raw, bad=bad: raw.update(bundled=bad))
        with pytest.raises(tk.FormatError, match="bundled"):
            layout.read_manifest(d)
    with pytest.raises(ValueError, match="exclude each other"):
        tk.CheckpointManager(os.path.join(tmp, "x"), one_file=True, incremental=True)
