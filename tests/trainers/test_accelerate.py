"""tensorkeep.accelerate on the real Accelerate (pinned in the extra): a tiny model on CPU.

Also a script (the kill test runs it in child processes):
``python test_accelerate.py {reference|train|resume} PROJECT_DIR``.
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from torch.utils.data import DataLoader, TensorDataset

import tensorkeep as tk
from tensorkeep import accelerate as tk_acc
from tensorkeep.checkpoint import layout
from tensorkeep.checkpoint import stage as stage_module
from tensorkeep.checkpoint.determinism import PINNED_ENV
from tensorkeep.checkpoint.stage import Stage
from tensorkeep.errors import CheckpointNotFoundError
from tensorkeep.verification import verify

STEPS, SAVE_EVERY = 14, 4  # 6 batches an epoch: saves land mid-epoch (steps 4, 8, 12)
KILL_ENV = "TK_TEST_KILL_IN_SAVE"
ASYNC_ENV = "TK_TEST_ASYNC_SAVE"  # the script's saves go through protect(acc, async_save=True)


class Counter:
    """The training step, saved with the checkpoint (register_for_checkpointing)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, sd: dict) -> None:
        self.step = sd["step"]


def build(project_dir: str, total_limit: int | None = 2, seed: int = 0, async_save: bool | str = False) -> tuple:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    acc = Accelerator(
        cpu=True,
        project_config=ProjectConfiguration(
            project_dir=project_dir, automatic_checkpoint_naming=True, total_limit=total_limit
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, use_stateful_dataloader=True),
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 4, generator=g)
    # its own generator: a loader's iterator then draws its seed from it, not from the global RNG
    dl = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4, shuffle=True, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    counter = Counter()
    model, opt, dl, sched = acc.prepare(model, opt, dl, sched)
    acc.register_for_checkpointing(counter)
    tk_acc.protect(acc, async_save=async_save)  # the two lines of the README: the import, and this
    return acc, model, opt, dl, sched, counter


def train(acc, model, opt, dl, sched, counter, stop: int = STEPS) -> None:
    """Dropout (torch), NumPy and Python draws, a shuffling loader, saves every SAVE_EVERY steps."""
    while counter.step < stop:
        for x, y in dl:  # after a resume: from the saved position in the saved epoch
            noise = 1e-3 * (np.random.rand() + random.random())
            acc.backward(F.mse_loss(model(x), y) + noise)
            opt.step()
            sched.step()
            opt.zero_grad()
            counter.step += 1
            if counter.step % SAVE_EVERY == 0:
                acc.save_state()
            if counter.step == stop:
                return


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _names(project_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(os.path.join(project_dir, "checkpoints")) if n != ".tensorkeep.lock")


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("async_save", [False, True, "lazy"], ids=["sync", "async", "lazy"])
def test_round_trip_continues_bit_identically(tmp, async_save):
    full = build(os.path.join(tmp, "full"))
    train(*full)
    assert _names(os.path.join(tmp, "full")) == ["checkpoint_1", "checkpoint_2"]

    first = build(os.path.join(tmp, "split"), async_save=async_save)  # training goes on while it writes
    train(*first, stop=8)  # checkpoint_0 at step 4, checkpoint_1 at step 8
    tk_acc.wait(first[0])
    d = os.path.join(tmp, "split", "checkpoints", "checkpoint_1")
    assert sorted(os.listdir(d)) == [
        "custom_checkpoint_0.tk",
        "dataloader.tk",
        "manifest.json",
        "model.safetensors",
        "optimizer.tk",
        "random_states_0.tk",
        "scheduler.tk",
    ]
    from safetensors.torch import load_model  # external readers load the weights file

    plain = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    load_model(plain, os.path.join(d, "model.safetensors"))
    assert _same(plain.state_dict(), weights(first[1]))

    shutil.copytree(os.path.join(tmp, "split"), os.path.join(tmp, "resumed"))  # a new process would see this
    second = build(os.path.join(tmp, "resumed"), seed=123)  # fresh objects, other RNG states
    assert tk_acc.load_state(second[0]) == os.path.join(tmp, "resumed", "checkpoints", "checkpoint_1")
    assert second[5].step == 8 and second[0].project_configuration.iteration == 2
    train(*second)
    assert _same(weights(second[1]), weights(full[1]))
    assert _same(second[2].state_dict()["state"][0], full[2].state_dict()["state"][0])


def test_total_limit_deletes_only_after_the_commit(tmp):
    acc, model, *_ = build(tmp, total_limit=1)
    seen: list[list[str]] = []
    acc.register_save_state_pre_hook(lambda models, weights, out: seen.append(_names(tmp)))
    tk_acc.save_state(acc)
    tk_acc.save_state(acc)
    assert "checkpoint_0" in seen[1]  # still there while checkpoint_1 was written (stock deleted it first)
    assert _names(tmp) == ["checkpoint_1"]

    def fail(models, weights, out):
        with open(os.path.join(out, "extra.txt"), "w") as f:
            f.write("a hook's file")
        raise RuntimeError("disk trouble")

    handle = acc.register_save_state_pre_hook(fail)
    with pytest.raises(RuntimeError, match="disk trouble"):
        tk_acc.save_state(acc)
    assert _names(tmp) == ["checkpoint_1"]  # the only checkpoint survives, no temp dir
    handle.remove()

    def extra(models, weights, out):
        with open(os.path.join(out, "extra.txt"), "w") as f:
            f.write("a hook's file")

    acc.register_save_state_pre_hook(extra)
    final = tk_acc.save_state(acc)  # iteration 2: the failed save did not count
    assert os.path.basename(final) == "checkpoint_2" and _names(tmp) == ["checkpoint_2"]
    assert layout.read_manifest(final).files["extra.txt"]["kind"] == "file"


def test_async_save_writes_the_state_of_the_moment_it_returned(tmp, monkeypatch):
    """The writer is held back until the training thread has changed the weights in place: the
    checkpoint still holds the values save_state saw; a failed write raises on the next call and
    publishes nothing; an explicit folder works the same."""
    acc, model, opt, *_ = build(tmp, async_save=True)
    go, real = threading.Event(), Stage.finish

    def held(self, objs):
        assert go.wait(30)
        return real(self, objs)

    monkeypatch.setattr(Stage, "finish", held)
    want = weights(model)
    final = tk_acc.save_state(acc)
    assert _names(tmp) != ["checkpoint_0"]  # not committed yet: its writer waits
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    go.set()
    tk_acc.wait(acc)
    assert _names(tmp) == ["checkpoint_0"] and _same(tk.load(os.path.join(final, "model.safetensors")), want)

    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(Stage, "finish", real)
    monkeypatch.setattr(stage_module, "write", full_disk)  # the file writer, called in the writer thread
    tk_acc.save_state(acc)  # returns: the error is the writer's
    with pytest.raises(OSError, match="No space left"):
        tk_acc.save_state(acc)  # waits for the failed one first
    assert _names(tmp) == ["checkpoint_0"]  # iteration 1 was not published, its temporary directory removed
    monkeypatch.undo()
    explicit = tk_acc.save_state(acc, os.path.join(tmp, "explicit"))
    tk_acc.wait(acc)
    assert _same(tk.load(os.path.join(explicit, "model.safetensors")), weights(model)) and verify(explicit).ok
    with pytest.raises(ValueError, match="one process"):
        tk_acc.protect(type("TwoProcesses", (), {"num_processes": 2})(), async_save=True)


def test_lazy_async_save_copies_weights_and_optimizer_state_before_the_next_step(tmp, monkeypatch):
    """async_save="lazy": the writer thread copies the parameters and the optimizer state; the next
    optimizer step waits for that copy, so the checkpoint holds the values of the moment of the call."""
    from tensorkeep.checkpoint.snapshot import Staging

    acc, model, opt, dl, *_ = build(tmp, async_save="lazy")
    go, real = threading.Event(), Staging.copy_deferred
    monkeypatch.setattr(Staging, "copy_deferred", lambda self: (go.wait(30), real(self))[1])
    x, y = next(iter(dl))

    def step() -> None:
        acc.backward(F.mse_loss(model(x), y))
        opt.step()
        opt.zero_grad()

    step()
    want = weights(model)
    final = tk_acc.save_state(acc)
    stepping = threading.Thread(target=step)
    stepping.start()
    stepping.join(0.5)
    assert stepping.is_alive()  # the step waits: the weights have not been copied yet
    go.set()
    stepping.join(30)
    tk_acc.wait(acc)
    assert _same(tk.load(os.path.join(final, "model.safetensors")), want) and verify(final).ok
    assert not _same(weights(model), want)  # the step ran, after the copy
    with pytest.raises(ValueError, match="'lazy'"):
        tk_acc.protect(acc, async_save="yes")

    # a second model no optimizer steps (an EMA copy): copied inside save_state, not deferred, so an
    # update through .data (invisible to version counters) while the copy is held cannot reach the file
    ema = acc.prepare(torch.nn.Linear(4, 4))
    go.clear()
    want_ema = weights(ema)
    final = tk_acc.save_state(acc)
    ema.weight.data.mul_(0.5)
    go.set()
    tk_acc.wait(acc)
    assert _same(tk.load(os.path.join(final, "model_1.safetensors")), want_ema)


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp):
    run = build(os.path.join(tmp, "a"), total_limit=None)
    train(*run, stop=8)
    ck = os.path.join(tmp, "a", "checkpoints")
    with open(os.path.join(ck, "checkpoint_1", "optimizer.tk"), "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\xff\xff\xff")
    shutil.copytree(os.path.join(tmp, "a"), os.path.join(tmp, "b"))
    acc, model, opt, dl, sched, counter = build(os.path.join(tmp, "b"), total_limit=None)
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*checkpoint_1"):
        assert tk_acc.load_state(acc).endswith("checkpoint_0")
    assert counter.step == 4 and acc.project_configuration.iteration == 2  # the next save does not collide
    with pytest.raises(CheckpointNotFoundError, match="optimizer.tk"):
        tk_acc.load_state(acc, os.path.join(tmp, "b", "checkpoints", "checkpoint_1"))
    os.remove(os.path.join(tmp, "b", "checkpoints", "checkpoint_0", "random_states_0.tk"))
    with warnings.catch_warnings(record=True) as seen:  # a missing RNG file is damage, not silently skipped
        warnings.simplefilter("always")
        assert tk_acc.load_state(acc) is None
    assert any("random_states_0.tk is missing" in str(w.message) for w in seen)


def test_stock_folders_and_unsupported_state_are_refused(tmp):
    acc, model, opt, *_ = build(tmp)
    acc.project_configuration.automatic_checkpoint_naming = False  # explicit folders from here on
    stock = os.path.join(tmp, "stock")
    Accelerator.save_state(acc, stock)  # pickles
    with pytest.raises(CheckpointNotFoundError, match="no manifest.json"):
        tk_acc.load_state(acc, stock)

    class Odd:
        def state_dict(self):
            return {"fn": print}

        def load_state_dict(self, sd):
            pass

    acc.register_for_checkpointing(Odd())
    with pytest.raises(TypeError, match=r"custom_checkpoint_1.tk cannot be saved without pickle"):
        tk_acc.save_state(acc, os.path.join(tmp, "explicit"))
    assert not os.path.exists(os.path.join(tmp, "explicit"))


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_kill9_mid_save_then_resume_is_bit_identical(tmp, async_save):
    """With async_save the kill lands in the writer thread while training goes on; each script ends
    without waiting for its last asynchronous save, which is committed at exit all the same."""
    mode = {ASYNC_ENV: "1"} if async_save else {}

    def run(phase: str, out: str, env: dict | None = None) -> subprocess.CompletedProcess:
        e = {**os.environ, **PINNED_ENV, **mode, **(env or {})}
        return subprocess.run([sys.executable, __file__, phase, out], env=e, capture_output=True, timeout=300)

    ref, out = os.path.join(tmp, "ref"), os.path.join(tmp, "run")
    p = run("reference", ref)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    assert _names(ref) == ["checkpoint_1", "checkpoint_2"]
    p = run("train", out, {KILL_ENV: "1"})  # killed while writing checkpoint_1 (step 8)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-3000:]
    left = glob.glob(os.path.join(out, "checkpoints", ".checkpoint_1.tk-tmp-*"))
    assert len(left) == 1 and {"model.safetensors", "optimizer.tk"} <= set(os.listdir(left[0]))
    assert _names(out) == [os.path.basename(left[0]), "checkpoint_0"]  # no checkpoint_1: never half-written
    p = run("resume", out)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    assert b"resumed from checkpoint_0 at step 4" in p.stdout
    assert _same(tk.load(os.path.join(out, "final.tk")), tk.load(os.path.join(ref, "final.tk")))
    assert _names(out) == ["checkpoint_1", "checkpoint_2"]


def test_two_processes_save_and_resume_bit_identically(tmp):
    """2 gloo processes started as torchrun would: one commit per checkpoint with each process's RNG
    and dataloader files; resumed on 2 processes from checkpoint_1, bit-identical to the full run."""

    def run(phase: str) -> list[str]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, **PINNED_ENV, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "lo"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, phase, tmp],
                env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for r in range(2)
        ]
        logs = [p.communicate(timeout=300)[0].decode() for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [log[-3000:] for log in logs]
        return logs

    run("reference")
    assert _names(tmp) == ["checkpoint_1", "checkpoint_2"]  # total_limit=2, applied after each commit
    d = os.path.join(tmp, "checkpoints", "checkpoint_1")
    assert sorted(os.listdir(d)) == [
        "custom_checkpoint_0.tk",
        "dataloader_rank0.tk",
        "dataloader_rank1.tk",
        "manifest.json",
        "model.safetensors",
        "optimizer.tk",
        "random_states_0.tk",
        "random_states_1.tk",
        "scheduler.tk",
    ]
    full = [tk.load(os.path.join(tmp, f"final_rank{r}.tk")) for r in range(2)]
    assert _same(full[0], full[1])  # DDP keeps the replicas equal
    shutil.rmtree(os.path.join(tmp, "checkpoints", "checkpoint_2"))
    for log in run("resume"):  # both processes from the same checkpoint
        assert "resumed from checkpoint_1 at step 8" in log, log[-3000:]
    for r in range(2):
        assert _same(tk.load(os.path.join(tmp, f"final_rank{r}.tk")), full[0]), r
    assert _names(tmp) == ["checkpoint_1", "checkpoint_2"] and verify(os.path.join(tmp, "checkpoints")).ok


# --------------------------------------------------------------------------------------------- script


def _arm_kill() -> None:
    """SIGKILL this process right after optimizer.tk of the second checkpoint is written."""
    real = Stage.write

    def write(self, name, obj, **kw):
        path = real(self, name, obj, **kw)
        if self.step == 1 and name == "optimizer.tk" and not self.defer:  # async: in the writer thread
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    Stage.write = write  # type: ignore[method-assign]


def main(phase: str, out: str) -> None:
    """``reference``/``train``/``resume`` in one process, or as one of several (torchrun's variables):
    then each process writes its own ``final_rank{i}.tk``."""
    acc, model, opt, dl, sched, counter = build(out, async_save=bool(os.environ.get(ASYNC_ENV)))
    if phase == "resume":
        where = acc.load_state()
        print(f"resumed from {os.path.basename(where)} at step {counter.step}", flush=True)
    if os.environ.get(KILL_ENV):
        _arm_kill()
    train(acc, model, opt, dl, sched, counter)
    name = "final.tk" if acc.num_processes == 1 else f"final_rank{acc.process_index}.tk"
    tk.save(weights(model), os.path.join(out, name))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
