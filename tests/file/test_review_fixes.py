"""Cases from the second adversarial review (issue 14): each failed before its fix."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from click.testing import CliRunner

import tensorkeep as tk
from support import ROOT
from tensorkeep.checkpoint import layout
from tensorkeep.cli import main as cli
from tensorkeep.core.format import seal
from tensorkeep.storage import local as _io


def _state(v: float) -> dict:
    return {"w": torch.full((16,), v), "epoch": int(v)}


def test_a_resave_killed_between_the_fallback_renames_loses_nothing(tmp):
    """Without RENAME_EXCHANGE (NFS, FUSE) a re-save moves the old step aside, then renames the new one
    in; killed between the two, the next open must put the old one back, not delete both."""
    with tk.CheckpointManager(tmp, keep_last=1) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _state(step))
    code = textwrap.dedent(f"""
        import os, torch, tensorkeep as tk
        from tensorkeep.storage import local as _io
        _io._exchange = lambda a, b: False
        real = _io.rename
        def rename(a, b):
            real(a, b)
            if _io.REPLACED in b:
                os._exit(9)  # the old step is parked, the new one not yet in place
        _io.rename = rename
        tk.CheckpointManager({tmp!r}, keep_last=1).save(3, {{"w": torch.full((16,), 30.0), "epoch": 30}})
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    assert not os.path.exists(layout.step_dir(tmp, 3))
    with pytest.warns(UserWarning, match="putting back"):
        with tk.CheckpointManager(tmp) as mgr:
            st = _state(0)
            assert mgr.restore(st) == 3 and st["epoch"] == 3 and torch.equal(st["w"], _state(3)["w"])
    assert not [n for n in os.listdir(tmp) if _io.temp_of(n)]


def test_save_sharded_never_deletes_what_an_index_names_that_is_not_a_weight_file(tmp):
    for n in ("config.json", "README.md", "model-00001-of-00002.safetensors"):
        with open(os.path.join(tmp, n), "w") as f:
            f.write(f"user's {n}")
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"a": "config.json", "b": "README.md", "c": "model-00001-of-00002.safetensors"}}, f)
    for size in (100_000, 40, 100_000):
        tk.save_sharded({"w": torch.ones(3), "v": torch.zeros(3)}, tmp, max_shard_size=size)
        assert open(os.path.join(tmp, "config.json")).read() == "user's config.json"
        assert open(os.path.join(tmp, "README.md")).read() == "user's README.md"
    assert torch.equal(tk.load(tmp)["w"], torch.ones(3))


def test_save_sharded_repairs_a_directory_whose_index_names_a_missing_shard(tmp):
    sd = {"a": torch.ones(100), "b": torch.zeros(100)}
    tk.save_sharded(sd, tmp, max_shard_size=400)
    os.unlink(os.path.join(tmp, "model-00001-of-00002.safetensors"))
    os.mkdir(os.path.join(tmp, "model-00002-of-00002.safetensors.d"))
    tk.save_sharded(sd, tmp, max_shard_size=400)  # the same names again: set aside what exists
    back = tk.load(tmp)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert not [n for n in os.listdir(tmp) if _io.temp_of(n)]


@pytest.mark.parametrize("kind", ["fifo", "directory", "socket"])
def test_tk_save_never_replaces_a_special_file(tmp, kind):
    p = os.path.join(tmp, "target")
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "directory":
        os.mkdir(p)
    else:
        import socket

        s = socket.socket(socket.AF_UNIX)
        s.bind(p)
    with pytest.raises(tk.SaveError, match="not a regular file"):
        tk.save(torch.ones(3), p)
    assert not os.path.isfile(p) and os.path.lexists(p)


def test_a_flipped_bit_in_a_manifest_is_damage_never_a_wrong_restore(tmp):
    net1, net2 = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    with tk.CheckpointManager(tmp) as mgr:
        mgr.save(1, {"model": net1, "epoch": 1})
        mgr.save(2, {"model": net2, "epoch": 2})
    p = os.path.join(layout.step_dir(tmp, 2), layout.MANIFEST)
    raw = open(p, "rb").read()
    for at in range(0, len(raw), 3):
        bad = bytearray(raw)
        bad[at] ^= 1 << (at % 8)
        with open(p, "wb") as f:
            f.write(bad)
        state = {"model": torch.nn.Linear(3, 3), "epoch": 0}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with tk.CheckpointManager(tmp, read_only=True) as mgr:
                got = mgr.restore(state)
        want = {1: net1, 2: net2}[got]
        assert state["epoch"] == got and torch.equal(state["model"].weight, want.weight), at
    with open(p, "wb") as f:
        f.write(raw)


def test_rng_states_that_cannot_be_restored_make_the_step_damaged_before_anything_is_applied(tmp):
    with tk.CheckpointManager(tmp) as mgr:
        mgr.save(1, {"model": torch.nn.Linear(2, 2), "epoch": 1})
        mgr.save(2, {"model": torch.nn.Linear(2, 2), "epoch": 2})
    p = os.path.join(layout.step_dir(tmp, 2), layout.MANIFEST)
    d = json.loads(open(p).read())
    d.pop("crc32")
    d["files"]["values.tk"]["kind"] = "rng"  # forged, checksum made to match
    d["files"]["rng.tk"]["kind"] = "values"
    with open(p, "wb") as f:
        f.write(seal(json.dumps(d, separators=(",", ":"))))
    net = torch.nn.Linear(2, 2)
    with tk.CheckpointManager(tmp) as mgr, pytest.warns(UserWarning, match="cannot be restored"):
        assert mgr.restore({"model": net, "epoch": 0}) == 1


def test_a_time_or_metric_out_of_range_damages_one_step_not_the_run(tmp):
    with tk.CheckpointManager(tmp, keep_best=("val_loss", "min")) as mgr:
        mgr.save(1, {"x": 1}, metrics={"val_loss": 1.0})
        mgr.save(2, {"x": 1}, metrics={"val_loss": 2.0})
    for step, edit in ((2, lambda d: d.update(time=5e12)), (1, lambda d: d["metrics"].update(val_loss=10**400))):
        p = os.path.join(layout.step_dir(tmp, step), layout.MANIFEST)
        d = json.loads(open(p).read())
        d.pop("crc32")
        edit(d)
        with open(p, "wb") as f:
            f.write(seal(json.dumps(d, separators=(",", ":"))))
    r = CliRunner().invoke(cli, ["ls", tmp])
    assert r.exit_code == 0 and r.output.count("DAMAGED") == 2, r.output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tk.CheckpointManager(tmp, keep_best=("val_loss", "min")) as mgr:
            mgr.save(3, {"x": 1}, metrics={"val_loss": 0.5})
    r = CliRunner().invoke(cli, ["prune", tmp, "--keep-best", "val_loss", "--dry-run"])
    assert r.exit_code == 0, r.output


def test_a_temp_file_still_locked_by_its_writer_is_not_removed(tmp):
    """A writer in another PID namespace looks dead by its pid; its flock says otherwise."""
    target = os.path.join(tmp, "m.tk")
    other = os.path.join(tmp, ".m.tk.tk-tmp-999999999-0123abcd")  # a pid that does not exist here
    fd = os.open(other, os.O_WRONLY | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        tk.save(torch.ones(2), target)
        assert os.path.exists(other)  # a live writer's file
    finally:
        os.close(fd)
    tk.save(torch.ones(2), target)
    assert not os.path.exists(other)  # now nobody holds it: a crashed save's leftover


def test_the_demo_marker_is_not_written_through_a_symlink(tmp):
    from tensorkeep import demo

    outside = os.path.join(tmp, "precious.txt")
    with open(outside, "w") as f:
        f.write("keep")
    d = os.path.join(tmp, "demo-run")
    os.makedirs(d)
    os.symlink(outside, os.path.join(d, ".tensorkeep-demo"))
    with pytest.raises(SystemExit):
        demo._fresh(d)
    assert open(outside).read() == "keep"


def test_restore_says_loudly_when_every_checkpoint_is_damaged(tmp):
    with tk.CheckpointManager(tmp) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
    for step in (1, 2):
        p = os.path.join(layout.step_dir(tmp, step), "values.tk")
        raw = bytearray(open(p, "rb").read())
        raw[-1] ^= 1
        with open(p, "wb") as f:
            f.write(raw)
    with tk.CheckpointManager(tmp) as mgr:
        with pytest.warns(UserWarning, match=r"ALL 2 checkpoint\(s\) are damaged"):
            assert mgr.restore(_state(0)) is None


def test_the_readme_says_which_writes_a_lazy_snapshot_cannot_see():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    part = readme[readme.index("**Lazy snapshots**") :][:1500]
    assert ".data" in part and "mgr.wait()" in part and "untyped_storage()" in part


def test_a_forked_child_does_not_keep_a_dead_writers_temp_file_alive(tmp):
    """The shared flock a writer holds on its temp file must die with the writer, not with its children."""
    code = textwrap.dedent(f"""
        import os, signal, time, torch, tensorkeep as tk
        from tensorkeep.storage import local as _io
        real = _io.pwrite_all
        def pwrite_all(fd, buf, off):
            real(fd, buf, off)
            if os.fork() == 0:       # a child (a loader worker, say) forked mid-write outlives its parent
                open(os.path.join({tmp!r}, "child.pid"), "w").write(str(os.getpid()))
                time.sleep(60)
                os._exit(0)
            while not os.path.exists(os.path.join({tmp!r}, "child.pid")):
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
        _io.pwrite_all = pwrite_all
        tk.save(torch.ones(4), os.path.join({tmp!r}, "m.tk"))
    """)
    subprocess.run([sys.executable, "-c", code], timeout=120)
    temps = [n for n in os.listdir(tmp) if _io.temp_of(n)]
    assert len(temps) == 1
    try:
        assert _io.is_stale_temp(temps[0], tmp)  # its writer is gone, though the child still lives
    finally:
        import signal

        os.kill(int(open(os.path.join(tmp, "child.pid")).read()), signal.SIGKILL)
