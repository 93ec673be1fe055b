"""TensorkeepCheckpointIO with the real Lightning (pinned in the extra), on a tiny model on the CPU.

The model, data and trainer are lightning_job.py's; the kill and DDP cases run it as a script.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections import OrderedDict
from typing import Any

import pytest
import torch

import tensorkeep as tk
from tensorkeep.checkpoint.determinism import PINNED_ENV
from tensorkeep.file.reader import open_reader
from tensorkeep.integrations import lightning as tkl
from tensorkeep.verification import verify

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lightning_job  # (tests/trainers/, next to this file)
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

from tensorkeep.lightning import TensorkeepCheckpointIO, load_from_checkpoint

JOB = os.path.abspath(lightning_job.__file__)
ENV = {**os.environ, **PINNED_ENV, "GLOO_SOCKET_IFNAME": "lo"}


def ckpts(run: str) -> list[str]:
    return sorted(os.listdir(os.path.join(run, "checkpoints")))


def path(run: str, name: str) -> str:
    return os.path.join(run, "checkpoints", name)


def same(a, b) -> bool:
    """Equal structure, types and values; tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return type(a) is type(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def flip_last_byte(p: str) -> None:
    """Damage the last tensor's last byte, as bit rot would."""
    with open(p, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x40]))


def train(run: str, epochs: int = 2, **kw):
    m = lightning_job.model(**kw.pop("hparams", {}))
    t = lightning_job.trainer(run, epochs=epochs, **kw)
    t.fit(m, lightning_job.loader())
    return t, m


def test_round_trip_of_a_real_checkpoint(tmp):
    plugin = TensorkeepCheckpointIO()
    saved = {}
    save = plugin.save_checkpoint

    def spy(ck, p, storage_options=None):
        saved[os.path.basename(p)] = copy.deepcopy(ck)  # its tensors are the live ones, trained further
        save(ck, p)

    plugin.save_checkpoint = spy
    _, m = train(tmp, plugin=plugin, hparams={"cfg": {"depth": 2, 3: ("a", None)}, "dtype": torch.float64})
    assert ckpts(tmp) == ["ck-step=10.ckpt", "ck-step=5.ckpt", "last.ckpt"]
    for name in ckpts(tmp):
        p = path(tmp, name)
        r = open_reader(p)
        assert not r.torch_pickle and r.metadata[tkl.MARK] == tkl.FORMAT, name
        r.close()
        assert verify(p).ok, name
        loaded = plugin.load_checkpoint(p)
        assert same(loaded, saved[name]), name  # every key, type and value Lightning produced
    last = plugin.load_checkpoint(path(tmp, "last.ckpt"), map_location=torch.device("cpu"))
    assert last["global_step"] == 10 and last["hyper_parameters"]["cfg"] == {"depth": 2, 3: ("a", None)}
    assert set(last) >= {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks"}
    assert same(plugin.load_checkpoint(path(tmp, "last.ckpt"), map_location=lambda s, loc: s), last)
    again = load_from_checkpoint(lightning_job.Lit, path(tmp, "last.ckpt"))
    assert again.hparams["dtype"] is torch.float64
    assert same(again.state_dict(), m.state_dict())


def test_unrepresentable_hyper_parameter_is_refused_with_the_fix(tmp):
    hparams = {"act": torch.nn.Tanh, "opts": argparse.Namespace(depth=2)}
    with pytest.raises(TypeError) as e:
        train(tmp, hparams=hparams)
    msg = str(e.value)
    assert "checkpoint['hyper_parameters']['act'] is of type builtins.type" in msg
    assert "checkpoint['hyper_parameters']['opts'] is of type argparse.Namespace (Namespace(depth=2))" in msg
    assert "save_hyperparameters(ignore=['act', 'opts'])" in msg and 'unsupported="skip"' in msg
    assert not os.path.exists(os.path.join(tmp, "checkpoints"))  # refused before anything was written

    run = os.path.join(tmp, "skip")
    with pytest.warns(UserWarning, match=r"checkpoint\['hyper_parameters'\]\['act'\] is of type builtins.type"):
        train(run, plugin=TensorkeepCheckpointIO(unsupported="skip"), hparams=hparams)
    with tk.open(path(run, "last.ckpt")) as f:
        assert json.loads(f.metadata[tkl.SKIPPED]) == [
            "checkpoint['hyper_parameters']['act']",
            "checkpoint['hyper_parameters']['opts']",
        ]
    assert tk.load(path(run, "last.ckpt"))["hyper_parameters"] == {"lr": 0.05}


def test_other_unstorable_values_are_always_refused(tmp):
    plugin = TensorkeepCheckpointIO(unsupported="skip")
    with pytest.raises(TypeError, match=r"(?s)checkpoint\[.extra.\]\[1\] is of type builtins.set .*on_save_checkpoint"):
        plugin.save_checkpoint({"state_dict": {}, "extra": [1, {2}]}, os.path.join(tmp, "x.ckpt"))
    assert os.listdir(tmp) == []


def test_damaged_file_raises_checksum_error(tmp):
    train(tmp)
    p = path(tmp, "ck-step=10.ckpt")
    flip_last_byte(p)
    with pytest.raises(tk.ChecksumError, match="ck-step=10.ckpt"):
        TensorkeepCheckpointIO().load_checkpoint(p)
    with pytest.raises(tk.ChecksumError):
        lightning_job.trainer(tmp, epochs=3).fit(lightning_job.model(), lightning_job.loader(), ckpt_path=p)


def test_stale_last_resumes_from_the_newest_intact_checkpoint(tmp):
    train(tmp)
    shutil.copyfile(path(tmp, "ck-step=5.ckpt"), path(tmp, "last.ckpt"))  # as if killed before last.ckpt's rename
    plugin = TensorkeepCheckpointIO()
    with pytest.warns(UserWarning, match=r"resuming from .*ck-step=10.ckpt \(step 10\): it was saved after"):
        assert plugin.load_checkpoint(path(tmp, "last.ckpt"))["global_step"] == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for a step checkpoint: that one, silently
        assert plugin.load_checkpoint(path(tmp, "ck-step=5.ckpt"))["global_step"] == 5

    started = lightning_job.StartedAt()
    with pytest.warns(UserWarning, match="resuming from"):
        lightning_job.trainer(tmp, epochs=3, callbacks=[started]).fit(
            lightning_job.model(), lightning_job.loader(), ckpt_path="last"
        )
    assert started.step == 10

    flip_last_byte(path(tmp, "ck-step=15.ckpt"))  # the newest is damaged: skipped, the next newest is used
    shutil.copyfile(path(tmp, "ck-step=5.ckpt"), path(tmp, "last.ckpt"))
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*ck-step=15.ckpt"):
        assert plugin.load_checkpoint(path(tmp, "last.ckpt"))["global_step"] == 10


def test_stock_checkpoint_io_resumes_from_a_stale_last(tmp):
    """The same stale last.ckpt with Lightning's own TorchCheckpointIO: it resumes from step 5 and the
    work of steps 6..10, saved in ck-step=10.ckpt, is redone (ckpt-chaos' LOST_WORK)."""
    train(tmp, plugin=TorchCheckpointIO())
    shutil.copyfile(path(tmp, "ck-step=5.ckpt"), path(tmp, "last.ckpt"))
    started = lightning_job.StartedAt()
    lightning_job.trainer(tmp, epochs=3, plugin=TorchCheckpointIO(), callbacks=[started]).fit(
        lightning_job.model(), lightning_job.loader(), ckpt_path="last"
    )
    assert started.step == 5


def test_save_top_k_removes_only_files_the_plugin_wrote(tmp):
    ck = ModelCheckpoint(
        dirpath=os.path.join(tmp, "top"),
        filename="ck-{step}",
        every_n_train_steps=2,
        save_top_k=1,
        monitor="step",
        mode="max",
    )
    plugin = TensorkeepCheckpointIO()
    train(tmp, plugin=plugin, callbacks=[ck])
    assert sorted(os.listdir(os.path.join(tmp, "top"))) == ["ck-step=10.ckpt"]

    foreign = os.path.join(tmp, "foreign.ckpt")
    torch.save({"w": torch.ones(2)}, foreign)
    with pytest.warns(UserWarning, match="not a checkpoint this plugin wrote"):
        plugin.remove_checkpoint(foreign)
    assert os.path.exists(foreign)
    plugin.remove_checkpoint(os.path.join(tmp, "top", "ck-step=10.ckpt"))
    plugin.remove_checkpoint(os.path.join(tmp, "top", "missing.ckpt"))  # nothing there: nothing to do
    assert os.listdir(os.path.join(tmp, "top")) == []


def test_object_store_url():
    plugin, url = TensorkeepCheckpointIO(), "memory://tk-lightning-test/run/ck-step=3.ckpt"
    ck = {"global_step": 3, "epoch": 0, "state_dict": OrderedDict(w=torch.arange(3.0))}
    plugin.save_checkpoint(ck, url)
    assert same(plugin.load_checkpoint(url, map_location="cpu"), ck)
    plugin.remove_checkpoint(url)
    with pytest.raises(FileNotFoundError):
        plugin.load_checkpoint(url)


def top1(d: str) -> ModelCheckpoint:
    """Every 2 steps, keeping only the newest (save_top_k=1: each save removes the one before)."""
    return ModelCheckpoint(
        dirpath=d, filename="ck-{step}", every_n_train_steps=2, save_top_k=1, monitor="step", mode="max"
    )


@pytest.mark.parametrize("own", [False, True], ids=["AsyncCheckpointIO", "async_save"])
def test_async_saves_rotate_and_keep_the_old_checkpoint_when_the_new_one_fails(tmp, monkeypatch, own):
    """Lightning's ``AsyncCheckpointIO(TensorkeepCheckpointIO())`` and the plugin's own ``async_save=True``."""

    def plugins() -> tuple[TensorkeepCheckpointIO, Any]:
        inner = TensorkeepCheckpointIO(async_save=own)
        return inner, inner if own else AsyncCheckpointIO(inner)

    d = os.path.join(tmp, "top")
    _, m = train(tmp, plugin=plugins()[1], callbacks=[top1(d)])
    assert sorted(os.listdir(d)) == ["ck-step=10.ckpt"]  # fit's end waited for the last write
    assert same(tk.load(os.path.join(d, "ck-step=10.ckpt"))["state_dict"], m.state_dict())

    # the write of step 10 fails on the writer thread after Lightning asked to remove step 8:
    # step 8 stays (a removal waits for a later save to commit), and the error reaches fit
    save = tkl.save

    def failing(obj, p, **kw):
        if p.endswith(os.path.join("top2", "ck-step=10.ckpt")):
            raise tk.SaveError(28, "injected: disk full")
        return save(obj, p, **kw)

    monkeypatch.setattr(tkl, "save", failing)
    d = os.path.join(tmp, "top2")
    inner, outer = plugins()
    with pytest.raises(tk.SaveError, match="injected"):
        train(tmp, plugin=outer, callbacks=[top1(d)], epoch_checkpoints=False)
    inner.teardown()  # what interpreter exit does (AsyncCheckpointIO does not call it; async_save: done already)
    assert os.listdir(d) == ["ck-step=8.ckpt"]
    assert tk.load(os.path.join(d, "ck-step=8.ckpt"))["global_step"] == 8


def run_job(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, JOB, *args], env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_kill_mid_save_then_resume_last_is_bit_exact(tmp, async_save):
    """SIGKILL just before the rename that publishes a checkpoint (its temporary file written and
    fsynced): (a) ck-step=10.ckpt, so the run resumes from step 5; (b) last.ckpt at step 10, after
    ck-step=10.ckpt was published: a stale last.ckpt (ckpt-chaos' LOST_WORK), resumed from step 10.
    Both resumed runs end bit-identical to an uninterrupted one."""
    runs = {"a": ("ck-step=10.ckpt:1", 5), "b": ("last.ckpt:2", 10)}
    procs = {
        k: subprocess.Popen(
            [sys.executable, JOB, "train", os.path.join(tmp, k), kill],
            env={**ENV, "TK_LIGHTNING_ASYNC": "1" if async_save else "0"},  # the job's plugin: async_save or not
            stderr=subprocess.PIPE,
        )
        for k, (kill, _) in runs.items()
    }
    for k, p in procs.items():
        _, err = p.communicate(timeout=300)
        assert p.returncode == -9, (k, p.returncode, err.decode()[-3000:])  # killed, not exited
    a, b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
    assert [n for n in ckpts(a) if n.startswith(".")][0].startswith(".ck-step=10.ckpt.tk-tmp-")
    assert [n for n in ckpts(b) if n.startswith(".")][0].startswith(".last.ckpt.tk-tmp-")
    assert (
        tk.load(path(b, "last.ckpt"))["global_step"] == 5 and tk.load(path(b, "ck-step=10.ckpt"))["global_step"] == 10
    )

    finals = {}  # each run resumed here, in another process than the killed one
    for run, (_, resumed_from) in zip((a, b), runs.values()):
        with open(os.path.join(run, "imports.json")) as f:
            assert json.load(f) == {"lightning_imported_by_tensorkeep": False}  # `import tensorkeep` imports none
        started, m = lightning_job.StartedAt(), lightning_job.model()
        lightning_job.trainer(run, callbacks=[started]).fit(m, lightning_job.loader(), ckpt_path="last")
        assert started.step == resumed_from, run
        finals[run] = m.state_dict()
        assert not [n for n in ckpts(run) if n.startswith(".")], run  # the killed save's temporary file was cleaned
    _, reference = train(os.path.join(tmp, "reference"), epochs=lightning_job.EPOCHS)  # uninterrupted
    for run, final in finals.items():
        assert list(final) == list(reference.state_dict()), run
        assert all(torch.equal(final[k], v) for k, v in reference.state_dict().items()), run


def test_ddp_two_gloo_ranks_resume_from_the_same_newest_checkpoint(tmp):
    train(tmp)  # ck-step=5, ck-step=10, last.ckpt; then last.ckpt goes stale
    shutil.copyfile(path(tmp, "ck-step=5.ckpt"), path(tmp, "last.ckpt"))
    r = run_job("ddp", tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = []
    for i in range(2):
        with open(os.path.join(tmp, f"rank{i}.json")) as f:
            ranks.append(json.load(f))
    assert [x["started"] for x in ranks] == [10, 10]  # rank 0 chose, both loaded the same file
    assert ranks[0]["saves"] == ["ck-step=15.ckpt", "last.ckpt"] and ranks[1]["saves"] == []  # only rank 0 writes
    w0, w1 = (tk.load(os.path.join(tmp, f"final_rank{i}.tk")) for i in range(2))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert tk.load(path(tmp, "last.ckpt"))["global_step"] == 15


def test_import_tensorkeep_lightning_alias():
    import tensorkeep.lightning as alias

    assert alias.TensorkeepCheckpointIO is tkl.TensorkeepCheckpointIO


def test_own_async_save_writes_the_values_of_the_moment_it_was_called(tmp):
    plugin, w = TensorkeepCheckpointIO(async_save=True), torch.arange(1 << 20, dtype=torch.float32)
    p = os.path.join(tmp, "a.ckpt")
    for step in range(3):
        plugin.save_checkpoint({"state_dict": {"w": w}, "global_step": step}, p)
        w.add_(1)  # training goes on while the file is written: the file keeps the values of the call
    plugin.wait()
    got = tk.load(p)
    assert got["global_step"] == 2 and torch.equal(got["state_dict"]["w"], torch.arange(1 << 20) + 2.0)


def test_own_async_save_writer_ends_at_teardown_and_a_forked_child_gets_its_own(tmp):
    """teardown (end of fit) closes the writer thread, a later save starts another; a child forked
    while the parent's writer existed writes through a writer of its own, not the parent's thread."""
    plugin, w = TensorkeepCheckpointIO(async_save=True), torch.arange(1 << 16, dtype=torch.float32)
    plugin.save_checkpoint({"state_dict": {"w": w}, "global_step": 1}, os.path.join(tmp, "a.ckpt"))
    first = plugin._bg
    plugin.teardown()
    assert plugin._bg is None and first is not None and first._writer._shutdown
    plugin.save_checkpoint({"state_dict": {"w": w}, "global_step": 2}, os.path.join(tmp, "b.ckpt"))
    plugin.wait()  # (a fork while another thread holds a lock is unsafe whatever the library does)
    parent_bg = plugin._bg
    pid = os.fork()
    if pid == 0:  # the child: its save must not wait forever on the parent's writer thread
        code = 1
        signal.alarm(60)  # a hang fails the test instead of stalling the suite
        torch.set_num_threads(1)  # torch's OpenMP pool is not usable after a fork (DataLoader workers do this too)
        try:
            plugin.save_checkpoint({"state_dict": {"w": w + 1}, "global_step": 3}, os.path.join(tmp, "c.ckpt"))
            plugin.wait()
            code = 0 if plugin._bg is not parent_bg else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    plugin.wait()
    assert tk.load(os.path.join(tmp, "c.ckpt"))["global_step"] == 3 and tk.load(os.path.join(tmp, "b.ckpt"))


def test_own_async_save_refuses_what_it_cannot_store_at_the_call(tmp):
    plugin = TensorkeepCheckpointIO(async_save=True)
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\] is of type .*argparse.Namespace"):
        plugin.save_checkpoint({"extra": argparse.Namespace(a=1)}, os.path.join(tmp, "x.ckpt"))
    assert not os.path.exists(os.path.join(tmp, "x.ckpt"))


EXIT_SCRIPT = """
import sys, torch
from tensorkeep import knobs
from tensorkeep.lightning import TensorkeepCheckpointIO
knobs.DIRECT_IO_MIN_BYTES = 1  # the direct-I/O writer: a thread pool of its own
plugin = TensorkeepCheckpointIO(async_save=True)
plugin.save_checkpoint({"state_dict": {"w": torch.arange(1 << 20, dtype=torch.float32)}, "global_step": 3}, sys.argv[1])
# the script ends while the write is in flight (trainer.save_checkpoint after fit, then exit)
"""


def test_own_async_save_in_flight_when_the_script_ends_is_finished(tmp):
    p = os.path.join(tmp, "final.ckpt")
    r = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, p], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "failed" not in r.stderr, r.stderr[-2000:]
    got = tk.load(p)
    assert got["global_step"] == 3 and torch.equal(got["state_dict"]["w"], torch.arange(1 << 20, dtype=torch.float32))
