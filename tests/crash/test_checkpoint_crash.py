"""Real processes, really killed: kill -9 during saves, bit-exact resume, disk full, SIGTERM."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import tensorkeep as tk
from support import script, sizes

pytestmark = pytest.mark.crash
PY = sys.executable


def _spawn(args, **kw):
    return subprocess.Popen([PY, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _committed_lines(out: str) -> list[int]:
    return [int(l.split()[1]) for l in out.splitlines() if l.startswith("COMMITTED")]


def _wait_for_commit(p, n_at_least: int, timeout: float = 120) -> list[int]:
    """Read stdout until at least n commits were reported; returns the steps seen."""
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        if line.startswith("COMMITTED"):
            seen.append(int(line.split()[1]))
            if len(seen) >= n_at_least:
                return seen
    raise AssertionError(f"job did not commit {n_at_least} checkpoints: {p.stderr.read()[-2000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("layout_flags", [[], ["--one-file"]], ids=["files", "one-file"])
def test_kill9_at_random_moments_never_loses_a_committed_checkpoint(tmp, layout_flags):
    from save_loop_job import expected

    rnd = random.Random(sizes.kill_seed)
    run = os.path.join(tmp, "run")
    last_committed = 0
    for trial in range(sizes.kill_trials):
        p = _spawn([script("save_loop_job.py"), run, "--mb", "4", *layout_flags])
        seen = _wait_for_commit(p, 1)
        time.sleep(rnd.uniform(0.0, 0.4))  # land somewhere inside a later save
        os.kill(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        seen += _committed_lines(out)
        last_committed = max(seen)
        with tk.CheckpointManager(run, keep_last=2) as mgr:
            lin = torch.nn.Linear(4, 4)
            st = {"model": lin, "step": 0, "data": {}}
            step = mgr.restore(st)
        assert step is not None and step >= last_committed, (trial, step, last_committed)
        assert st["step"] == step
        want = expected(step, 4)
        assert torch.equal(st["data"]["a"], want["a"]) and torch.equal(st["data"]["b"], want["b"])
        assert torch.equal(lin.weight, torch.full((4, 4), float(step)))


def _final(path):
    return tk.load(path)


@pytest.mark.parametrize("recipe,kill_after", [("epoch", 2), ("mid", 3)])
@pytest.mark.slow
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp, recipe, kill_after):
    job = script("train_job.py")
    ref_out = os.path.join(tmp, "ref.tk")
    r = subprocess.run(
        [PY, job, os.path.join(tmp, "ref-run"), ref_out, "--recipe", recipe],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run, out = os.path.join(tmp, "run"), os.path.join(tmp, "resumed.tk")
    p = _spawn([job, run, out, "--recipe", recipe, "--sleep", "0.01"])
    _wait_for_commit(p, kill_after)
    os.kill(p.pid, signal.SIGKILL)  # a power cut, mid-training
    p.communicate()
    assert not os.path.exists(out)
    r = subprocess.run([PY, job, run, out, "--recipe", recipe], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed_from = _committed_lines(r.stdout)[0]
    assert resumed_from > kill_after - 1 if recipe == "epoch" else resumed_from > 0
    a, b = _final(ref_out), _final(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(
            a[k].view(torch.uint8) if a[k].dtype.is_floating_point else a[k],
            b[k].view(torch.uint8) if b[k].dtype.is_floating_point else b[k],
        ), k


def test_disk_full_during_save_keeps_committed_checkpoints(tmp):
    run = os.path.join(tmp, "run")
    code = f"""
import resource, signal, torch, tensorkeep as tk
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
mgr = tk.CheckpointManager({run!r})
mgr.save(1, {{"w": torch.ones(1000)}})
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    mgr.save(2, {{"w": torch.zeros(1_000_000)}})
except tk.SaveError as e:
    print("SAVEERROR", e.errno, e)
mgr.close()
"""
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120)
    assert "SAVEERROR 27" in r.stdout, r.stdout + r.stderr  # EFBIG
    assert "step 2 was not saved" in r.stdout and "intact" in r.stdout
    assert sorted(os.listdir(run)) == ["step_00000001"]
    with tk.CheckpointManager(run) as mgr:
        st = {"w": None}
        assert mgr.restore(st) == 1 and torch.equal(st["w"], torch.ones(1000))


def test_sigterm_saves_a_final_checkpoint_then_exits(tmp):
    run = os.path.join(tmp, "run")
    code = f"""
import signal, time, torch, tensorkeep as tk
mgr = tk.CheckpointManager({run!r}, save_interval_steps=1000)
state = {{"step": 0, "w": torch.zeros(3)}}
mgr.save_on_signal(state, signals=(signal.SIGTERM,))
step = 0
while True:
    step += 1
    state["step"] = step
    state["w"] += 1
    print("STEP", step, flush=True)
    time.sleep(0.01)
    if mgr.should_save(step):
        mgr.save(step, state)
"""
    p = _spawn(["-c", code])
    for _ in range(20):
        p.stdout.readline()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGTERM, err
    with tk.CheckpointManager(run) as mgr:
        st = {"step": 0, "w": torch.zeros(3)}
        step = mgr.restore(st)
    assert step is not None and step >= 20 and st["step"] == step
    assert torch.equal(st["w"], torch.full((3,), float(step)))
