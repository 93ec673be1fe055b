"""Asynchronous saves: snapshot isolation, reused staging buffers, errors surfaced, kill -9 safety."""

import errno
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import tensorkeep as tk
from support import script, sizes
from tensorkeep import knobs
from tensorkeep.storage import local as _io


@pytest.fixture(autouse=True)
def staged(monkeypatch):
    """These tests drive the staging buffers and the background writer. Files of a few kB are
    otherwise built whole inside save() (see test_small_files_are_built_inside_save)."""
    monkeypatch.setattr(knobs, "ONE_WRITE_BYTES", 0)


def test_save_returns_snapshot_and_later_mutation_is_not_saved(tmp):
    st = {"w": torch.zeros(300, 300), "model": torch.nn.Linear(8, 8), "n": 0}
    with tk.CheckpointManager(tmp, async_save=True) as mgr:
        for s in (1, 2, 3):
            st["w"].fill_(s)
            st["n"] = s
            with torch.no_grad():
                st["model"].weight.fill_(s)
            mgr.save(s, st, metrics={"s": s})
            st["w"].fill_(-1)  # the training loop goes on right away
            with torch.no_grad():
                st["model"].weight.fill_(-1)
        mgr.wait()
        assert mgr.steps() == [1, 2, 3]
        for s in (1, 2, 3):
            back = {"w": torch.zeros(300, 300), "model": torch.nn.Linear(8, 8), "n": 0}
            assert mgr.restore(back, step=s) == s
            assert torch.equal(back["w"], torch.full((300, 300), float(s))) and back["n"] == s
            assert torch.equal(back["model"].weight, torch.full((8, 8), float(s)))


def test_staging_buffers_are_reused(tmp):
    st = {"w": torch.randn(100, 100)}
    with tk.CheckpointManager(tmp, async_save=True) as mgr:
        mgr.save(1, st)
        first = {k: v.data_ptr() for k, v in mgr._background._staging._bufs.items()}
        mgr.save(2, st)
        mgr.wait()
        second = {k: v.data_ptr() for k, v in mgr._background._staging._bufs.items()}
    assert first and first == second


def test_tied_weights_stay_tied_in_snapshot(tmp):
    emb = torch.nn.Embedding(50, 8)
    head = torch.nn.Linear(8, 50, bias=False)
    head.weight = emb.weight
    m = torch.nn.ModuleDict({"emb": emb, "head": head})
    with tk.CheckpointManager(tmp, async_save=True) as mgr:
        mgr.save(1, {"model": m})
        mgr.wait()
        sd = tk.load(os.path.join(mgr.path(1), "model.tk"))
    assert sd["emb.weight"].data_ptr() == sd["head.weight"].data_ptr()


@pytest.mark.parametrize("mode", [True, "lazy"])
def test_conjugate_views_are_not_their_base_in_snapshot(tmp, mode):
    c = torch.tensor([1 + 2j, -3 + 0.5j], dtype=torch.complex64)
    st = {"c": c, "conj": c.conj(), "imag": c.imag, "neg_imag": c.conj().imag}
    with tk.CheckpointManager(tmp, async_save=mode) as mgr:
        mgr.save(1, st)
        mgr.wait()
        back = {k: torch.zeros_like(v.resolve_conj().resolve_neg()) for k, v in st.items()}
        assert mgr.restore(back) == 1
    for k, v in st.items():
        assert torch.equal(back[k], v.resolve_conj().resolve_neg()), k


def _fail_writes(monkeypatch):
    real = _io.pwrite_all

    def failing(fd, buf, off):
        if len(buf) > 1000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buf, off)

    monkeypatch.setattr(_io, "pwrite_all", failing)


@pytest.mark.parametrize("surface", ["save", "wait", "close"])
def test_background_error_is_raised_by_next_call(tmp, monkeypatch, surface):
    mgr = tk.CheckpointManager(tmp, async_save=True)
    mgr.save(1, {"w": torch.ones(1000)})
    mgr.wait()
    _fail_writes(monkeypatch)
    mgr.save(2, {"w": torch.zeros(1000)})  # returns: the failure happens in the background
    with pytest.raises(tk.SaveError, match="step 2 was not saved"):
        if surface == "save":
            mgr.save(3, {"w": torch.zeros(1000)})
        elif surface == "wait":
            mgr.wait()
        else:
            mgr.close()
    monkeypatch.undo()
    if not mgr._closed:
        mgr.close()
    with tk.CheckpointManager(tmp) as m2:
        assert m2.steps() == [1]
        st = {"w": None}
        assert m2.restore(st) == 1 and torch.equal(st["w"], torch.ones(1000))
    assert [f for f in os.listdir(tmp) if "tk-tmp" in f] == []


def test_pending_save_finished_at_interpreter_exit(tmp):
    code = f"""
import torch, tensorkeep as tk
mgr = tk.CheckpointManager({tmp!r}, async_save=True)
mgr.save(7, {{"w": torch.ones(2_000_000)}})
# no wait(), no close(): the interpreter exits with the write in flight
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with tk.CheckpointManager(tmp) as mgr:
        st = {"w": None}
        assert mgr.restore(st) == 7 and torch.equal(st["w"], torch.ones(2_000_000))


@pytest.mark.crash
@pytest.mark.slow
def test_kill9_during_async_saves(tmp):
    from save_loop_job import expected

    rnd = random.Random(7)
    run = os.path.join(tmp, "run")
    for _ in range(sizes.async_kill_trials):
        p = subprocess.Popen(
            [sys.executable, script("save_loop_job.py"), run, "--mb", "4", "--async-save"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = p.stdout.readline()
        assert line.startswith("COMMITTED"), p.stderr.read()[-2000:]
        time.sleep(rnd.uniform(0, 0.3))
        os.kill(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        # a kill between two writes of the child may cut its last line: only whole ones count
        submitted = max(int(m[1]) for x in [line, *out.splitlines()] if (m := re.fullmatch(r"COMMITTED (\d+)\s*", x)))
        # with async saves "COMMITTED s" means s was submitted and s-1 is durable
        with tk.CheckpointManager(run) as mgr:
            st = {"model": torch.nn.Linear(4, 4), "step": 0, "data": {}}
            step = mgr.restore(st)
        assert step is not None and step >= submitted - 1 and st["step"] == step
        want = expected(step, 4)
        assert torch.equal(st["data"]["a"], want["a"]) and torch.equal(st["data"]["b"], want["b"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_snapshot_is_taken_before_the_next_optimizer_step(tmp_path):
    """save() only queues the device-to-host copies; an optimizer step queued right after must
    not leak into the checkpoint (the GPU orders it after the copies)."""
    net = torch.nn.Linear(2048, 2048).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    want = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    with tk.CheckpointManager(str(tmp_path / "run"), async_save=True) as mgr:
        mgr.save(1, {"model": net})
        net(torch.randn(64, 2048, device="cuda")).square().sum().backward()
        opt.step()  # changes every parameter, queued right behind the copies
        mgr.wait()
    back = torch.nn.Linear(2048, 2048)
    with tk.CheckpointManager(str(tmp_path / "run")) as mgr:
        assert mgr.restore({"model": back}) == 1
    assert all(torch.equal(want[k], v) for k, v in back.state_dict().items())


def _lazy_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 4))


def test_lazy_snapshot_is_taken_before_the_next_optimizer_step(tmp_path, monkeypatch):
    """async_save='lazy': parameters and optimizer state are copied in the background; the next
    optimizer.step() waits for that copy, and buffers (BatchNorm statistics, changed by every
    forward pass) are copied inside save()."""
    from tensorkeep.checkpoint.snapshot import Staging

    real = Staging.copy_deferred

    def slow(self):
        time.sleep(0.3)  # the training step below starts before the background copy
        return real(self)

    monkeypatch.setattr(Staging, "copy_deferred", slow)
    net = _lazy_net()
    opt = torch.optim.Adam(net.parameters(), lr=0.1)

    def step():
        opt.zero_grad()
        net(torch.randn(8, 64)).square().mean().backward()  # also updates BatchNorm's running stats
        opt.step()

    step()
    run = str(tmp_path / "run")
    with tk.CheckpointManager(run, async_save="lazy") as mgr:
        mgr.save(1, {"model": net, "optimizer": opt})
        want = {k: v.clone() for k, v in net.state_dict().items()}
        want_opt = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state_dict()["state"].items()}
        step()  # forward changes the buffers at once; opt.step() waits for the deferred copy
        mgr.wait()
    assert not torch.equal(want["0.weight"], net.state_dict()["0.weight"])  # the step did happen
    back, back_opt = _lazy_net(), None
    back_opt = torch.optim.Adam(back.parameters(), lr=0.1)
    with tk.CheckpointManager(run) as mgr:
        assert mgr.restore({"model": back, "optimizer": back_opt}) == 1
    assert all(torch.equal(want[k], v) for k, v in back.state_dict().items())
    got_opt = back_opt.state_dict()["state"]
    assert all(torch.equal(want_opt[k][n], got_opt[k][n]) for k in want_opt for n in want_opt[k])


def test_lazy_snapshot_refuses_a_parameter_changed_outside_the_optimizer(tmp_path, monkeypatch):
    from tensorkeep.checkpoint.snapshot import Staging

    real = Staging.copy_deferred
    monkeypatch.setattr(Staging, "copy_deferred", lambda self: (time.sleep(0.3), real(self))[1])
    net = _lazy_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)  # its parameters are the ones deferred
    run = str(tmp_path / "run")
    with tk.CheckpointManager(run, async_save="lazy") as mgr:
        mgr.save(1, {"model": net, "optimizer": opt})
        mgr.wait()
        mgr.save(2, {"model": net, "optimizer": opt})
        with torch.no_grad():
            net[0].weight.add_(1.0)  # a manual update while the copy has not run yet
        with pytest.raises(tk.TensorkeepError, match="changed in place while async_save='lazy'"):
            mgr.wait()
        assert mgr.steps() == [1]  # the torn checkpoint was not published
    with pytest.raises(ValueError, match="'lazy'"):
        tk.CheckpointManager(str(tmp_path / "other"), async_save="yes")
    with tk.CheckpointManager(str(tmp_path / "staged"), async_save=True) as mgr:
        with pytest.raises(ValueError, match=r"lazy=\.\.\.\) needs defer=True"):
            with mgr.stage(1, lazy=[net]):
                pass


def test_only_what_an_optimizer_steps_is_deferred():
    """async_save="lazy" defers a tensor only if nothing but optimizer.step() changes it: not a model
    no optimizer steps (an EMA copy), not a frozen parameter, nothing of a schedule-free or LOMO
    optimizer (they move parameters outside step()), also inside a wrapper (as Accelerate's)."""
    from tensorkeep.checkpoint.background import changed_only_by_optimizers

    class Wrapper(torch.optim.Optimizer):  # what accelerate's AcceleratedOptimizer does
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer

        param_groups = property(lambda self: self.optimizer.param_groups)  # type: ignore[assignment]
        state = property(lambda self: self.optimizer.state)  # type: ignore[assignment]

        def train(self) -> None:  # AcceleratedOptimizer has these whatever it wraps
            pass

    net, ema = _lazy_net(), _lazy_net()
    net[2].weight.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.randn(8, 64)).sum().backward()
    opt.step()
    got = changed_only_by_optimizers({"model": net, "ema": ema, "optimizer": opt})
    stepped = {p.data_ptr() for n, p in net.named_parameters() if n != "2.weight"}
    state = {t.data_ptr() for s in opt.state.values() for t in s.values()}
    assert got == stepped | state and not {p.data_ptr() for p in ema.parameters()} & got

    class ScheduleFree(torch.optim.SGD):
        def train(self) -> None: ...

    class Lomo(torch.optim.SGD): ...

    for odd in (ScheduleFree(net.parameters(), lr=0.1), Lomo(net.parameters(), lr=0.1)):
        assert changed_only_by_optimizers({"model": net, "optimizer": odd}) == frozenset()
        assert changed_only_by_optimizers({"optimizer": Wrapper(odd)}) == frozenset()
    assert changed_only_by_optimizers({"optimizer": Wrapper(opt)}) == stepped | state


def test_failed_lazy_saves_leave_optimizer_steps_free(tmp_path, monkeypatch):
    import threading

    from tensorkeep.checkpoint import background

    net = _lazy_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with tk.CheckpointManager(str(tmp_path / "run"), async_save="lazy") as mgr:
        real = background.threads.submit

        def interrupted(*a, **kw):
            raise KeyboardInterrupt  # Ctrl-C after the lazy snapshot, before its copy is queued

        monkeypatch.setattr(background.threads, "submit", interrupted)
        with pytest.raises(KeyboardInterrupt):
            mgr.save(0, {"model": net, "optimizer": opt})
        monkeypatch.setattr(background.threads, "submit", real)
        stepping = threading.Thread(target=opt.step)
        stepping.start()
        stepping.join(10)
        assert not stepping.is_alive()  # no copy will run: the step does not wait for one
        with pytest.raises(TypeError):
            mgr.save(1, {1: net, "optimizer": opt})  # refused inside save(): nothing is deferred
        opt.step()  # must not wait for a copy that will never happen
        mgr.save(2, {"model": net, "optimizer": opt, "bad": {1, 2}})  # refused by the writer, after its copy
        opt.step()
        with pytest.raises(TypeError, match="set"):
            mgr.wait()
        mgr.save(3, {"model": net, "optimizer": opt})
        mgr.wait()
        assert mgr.steps() == [3]


@pytest.mark.parametrize("mode", [True, "lazy"])
def test_small_files_are_built_inside_save(tmp_path, monkeypatch, mode):
    monkeypatch.setattr(knobs, "ONE_WRITE_BYTES", 1 << 20)
    net = _lazy_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with tk.CheckpointManager(str(tmp_path / "run"), async_save=mode) as mgr:
        with pytest.raises(TypeError, match="set"):  # refused by save() itself, not later by the writer
            mgr.save(1, {"model": net, "bad": {1, 2}})
        expect = {k: v.clone() for k, v in net.state_dict().items()}
        mgr.save(2, {"model": net, "optimizer": opt})
        assert mgr._background._staging._bufs == {}  # no staging: the file's bytes were complete when save() returned
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)  # outside any optimizer: fine, the bytes were already copied
        mgr.wait()
        assert mgr.steps() == [2]
        back = tk.load(os.path.join(mgr.path(2), "model.tk"))
    assert all(torch.equal(back[k], v) for k, v in expect.items())


@pytest.mark.parametrize("incremental", [False, True])
def test_a_container_that_holds_itself_is_refused_clearly(tmp_path, incremental):
    d = {}
    d["self"] = d
    with tk.CheckpointManager(str(tmp_path / "run"), async_save=True, incremental=incremental) as mgr:
        with pytest.raises(ValueError, match="nested more than .* cycle"):
            mgr.save(1, {"x": d, "w": torch.ones(3)})
        mgr.save(2, {"w": torch.ones(3)})
        mgr.wait()
        assert mgr.steps() == [2]
