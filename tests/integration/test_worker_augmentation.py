"""Random augmentation inside DataLoader workers: what resumes bit-exactly out of the box, and
what needs tk.SampleRNG (per-sample seeds from (seed, epoch, index)).

torchdata's StatefulDataLoader saves the iterator's base seed, the sampler's generator and
position, and a dataset's own state_dict, but not its workers' generators. Measured here: with
0 workers (the main process augments, its generators are checkpointed) a mid-epoch resume is
exact; with 2 workers it diverges mid-epoch; with persistent workers at any resume. With
SampleRNG all three are exact. A plain DataLoader with checkpoints at epoch ends is exact without
help unless its workers are persistent. --worker-kill-trials sets the kills per real training run.
"""

import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tensorkeep as tk
from support import script, sizes
from tensorkeep.checkpoint import determinism, rng, sample_seed
from tensorkeep.storage import local as _io
from worker_job import Augmented

HANG = 120  # seconds: only to turn a hang into a failure
LAYOUTS = {
    "0 workers": ["--workers", "0"],
    "2 workers": ["--workers", "2"],
    "2 persistent workers": ["--workers", "2", "--persistent"],
}


# ------------------------------------------------------------------ seeded / SampleRNG


def _draw():
    return torch.rand(3).numpy().tobytes(), random.random(), np.random.rand(2).tobytes()


@given(st.lists(st.integers(), max_size=4))
def test_seeded_draws_depend_only_on_the_key_and_move_no_stream(key):
    before = rng.capture()
    with tk.seeded(*key) as seed:
        a = _draw()
    assert seed == sample_seed(*key)
    _draw()  # the process's own streams move on
    with tk.seeded(*key):
        b = _draw()
    assert a == b
    rng.restore(before)
    expected = _draw()
    rng.restore(before)
    with tk.seeded(*key):
        _draw()
    assert _draw() == expected  # as if the block had not run


def test_sample_seed_is_fixed_forever():
    """Changing it would change every sample's augmentation: a run resumed by a newer version would diverge."""
    assert sample_seed(1234, 2, 17) == 13733511776090404324
    assert sample_seed() == 13020603013274838756
    assert sample_seed(-1, 2**70) == 13145496023708523541
    assert sample_seed(np.int64(3), torch.tensor(4)) == sample_seed(3, 4)
    assert len({sample_seed(0, e, i) for e in range(20) for i in range(500)}) == 10000


def test_seeded_refuses_what_is_not_an_integer():
    with pytest.raises(TypeError, match=r"seeded\(\) takes integers.*0.5"):
        with tk.seeded(1, 0.5):
            pass
    with pytest.raises(TypeError, match=r"SampleRNG\(seed\) takes integers"):
        tk.SampleRNG(seed="0")
    r = tk.SampleRNG()
    with pytest.raises(TypeError, match="SampleRNG.set_epoch takes integers"):
        r.set_epoch(1.0)
    with pytest.raises(ValueError, match="does not fit 64 bits"):
        r.set_epoch(2**63)
    assert r.epoch == 0


class _Epochs(torch.utils.data.Dataset):
    def __init__(self):
        self.rng = tk.SampleRNG(seed=5)

    def __len__(self):
        return 4

    def __getitem__(self, i):
        with self.rng(i) as seed:
            return self.rng.epoch, seed


def test_set_epoch_reaches_persistent_workers():
    ds = _Epochs()
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    for epoch in range(3):
        ds.rng.set_epoch(epoch)
        got = list(loader)
        assert [int(e) for e, _ in got] == [epoch] * 4
        assert [int(s) for _, s in got] == [sample_seed(5, epoch, i) for i in range(4)]


# ------------------------------------------------------------------ the data stream across a resume


def _loader(workers: int, persistent: bool, seeding: str):
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    from torchdata.stateful_dataloader import StatefulDataLoader

    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    ds = Augmented(x, torch.zeros(64, dtype=torch.long), seeding)
    return ds, StatefulDataLoader(ds, batch_size=8, shuffle=True, num_workers=workers, persistent_workers=persistent)


def _stream(run: str, workers: int, persistent: bool, seeding: str, stop: int | None = None) -> bytes:
    """Every batch of 2 epochs; with ``stop``, a checkpoint after that many batches and a resume
    from it into a fresh loader (as a restarted process would)."""
    ds, loader = _loader(workers, persistent, seeding)
    out, step, total = [], 0, 2 * len(loader)
    while step < total:
        ds.rng.set_epoch(step // len(loader))
        with tk.keep_rng():
            it = iter(loader)
        for xb, _ in it:
            out.append(xb.numpy().tobytes())
            torch.rand(1), random.random(), np.random.rand()  # the main process draws too (dropout, ...)
            step += 1
            if step == stop:
                with tk.CheckpointManager(run) as mgr:
                    mgr.save(step, {"loader": loader})
                del it
                ds, loader = _loader(workers, persistent, seeding)
                with tk.CheckpointManager(run) as mgr:
                    assert mgr.restore({"loader": loader}) == stop
                break
    return b"".join(out)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_what_resumes_exactly_with_and_without_sample_seeds(tmp, layout):
    workers, persistent = int(LAYOUTS[layout][1]), "--persistent" in LAYOUTS[layout]
    exact = {}
    for seeding in ("none", "sample"):
        ref = _stream(os.path.join(tmp, "ref"), workers, persistent, seeding)
        for stop in (3, 8, 11):  # mid-epoch, at the end of the first epoch, mid-epoch
            exact[seeding, stop] = (
                _stream(os.path.join(tmp, f"{seeding}-{stop}"), workers, persistent, seeding, stop) == ref
            )
    assert all(exact["sample", s] for s in (3, 8, 11)), exact
    if workers == 0:  # the main process augments: its generators are in the checkpoint
        assert all(exact["none", s] for s in (3, 8, 11)), exact
    elif not persistent:  # new workers each epoch, seeded from the restored global RNG
        assert exact["none", 8] and not exact["none", 3] and not exact["none", 11], exact
    else:  # persistent workers are never reseeded: no resume is exact
        assert not any(exact["none", s] for s in (3, 8, 11)), exact


def _epochs(workers: int, persistent: bool, seeding: str, resume_at: int | None = None) -> bytes:
    """Recipe 1: a plain DataLoader, checkpoints at epoch ends (here: the RNG states, captured and
    restored around a fresh dataset and loader at epoch ``resume_at``, as a restarted process)."""

    def make():
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
        ds = Augmented(x, torch.zeros(64, dtype=torch.long), seeding)
        return ds, torch.utils.data.DataLoader(
            ds, batch_size=8, shuffle=True, num_workers=workers, persistent_workers=persistent
        )

    ds, loader = make()
    out = []
    for epoch in range(3):
        if epoch == resume_at:
            saved = rng.capture()
            ds, loader = make()
            rng.restore(saved)
        ds.rng.set_epoch(epoch)
        for xb, _ in loader:
            out.append(xb.numpy().tobytes())
            torch.rand(1)
    return b"".join(out)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_epoch_end_checkpoints_with_a_plain_dataloader(layout):
    """Fresh workers each epoch are seeded from the restored global RNG: exact without help.
    Persistent workers are not, even with SampleRNG: the first iterator after a resume draws a base
    seed before the shuffle seed, which the uninterrupted run drew once, in its first epoch, so
    that epoch's order differs (StatefulDataLoader keeps its sampler's own generator: use it)."""
    workers, persistent = int(LAYOUTS[layout][1]), "--persistent" in LAYOUTS[layout]
    for seeding in ("none", "sample"):
        ref = _epochs(workers, persistent, seeding)
        assert (_epochs(workers, persistent, seeding, resume_at=1) == ref) == (not persistent), seeding


# ------------------------------------------------------------------ real training, really killed


class Jobs:
    """worker_job.py's jobs, forked from one process that imported torch once (see its serve())."""

    def __init__(self) -> None:
        self.p = subprocess.Popen(
            [sys.executable, script("worker_job.py"), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **determinism.PINNED_ENV},
        )

    def _ask(self, cmd: list) -> int:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return int(self.p.stdout.readline().split()[1])

    def start(self, argv: list[str], log: str) -> int:
        return self._ask(["run", argv, log])

    def wait(self, pid: int) -> int:
        return self._ask(["wait", pid])

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=HANG)


@pytest.fixture(scope="module")
def jobs():
    j = Jobs()
    yield j
    j.close()


def _tail(log: str):
    """The job's output lines, as they come."""
    deadline, buf = time.monotonic() + HANG, ""
    while not os.path.exists(log):
        time.sleep(0.001)
    with open(log) as f:
        while time.monotonic() < deadline:
            chunk = f.read()
            if not chunk:
                time.sleep(0.001)
                continue
            buf += chunk
            *lines, buf = buf.split("\n")
            yield from lines
    raise AssertionError(f"{log}: no progress for {HANG} s")


def _run(
    jobs: Jobs,
    tmp: str,
    name: str,
    args: list[str],
    kills,
    rnd: random.Random | None = None,
    landed: list[int] | None = None,
) -> dict:
    """Train to the end, killed (SIGKILL) at the moments ``kills`` picks and restarted at once.

    ``kills(resumed, rnd) -> (kind, step)``: kill at ``STEP step``, or at the first save from
    ``step`` on (``SAVING``: inside the save); None: let it finish. Returns the final weights' bytes;
    ``landed`` gets the step of each kill that really hit a running job."""
    run, out = os.path.join(tmp, name), os.path.join(tmp, f"{name}.tk")
    for attempt in range(100):
        log = os.path.join(tmp, f"{name}-{attempt}.log")
        pid = jobs.start([run, out, *args, "--sleep", "0.005"], log)
        plan = None
        try:
            for line in _tail(log):
                word, _, n = line.partition(" ")
                if word == "RESUMED":
                    plan = kills(int(n), rnd)
                elif word in ("STEP", "SAVING") and plan and word == plan[0] and int(n) >= plan[1]:
                    time.sleep(rnd.uniform(0, 0.02) if rnd else 0)
                    os.kill(pid, 9)
                    break
                elif word == "EXITED":
                    break
        except BaseException:
            os.kill(pid, 9)
            jobs.wait(pid)
            raise
        code = jobs.wait(pid)  # reaped: the next start is a restart right after a crash
        with open(log) as f:
            text = f.read()
        assert code in (0, -9), f"job failed (exit {code}), restarted right after a kill:\n{text[-3000:]}"
        if code == -9 and landed is not None:
            landed.append(attempt)
        if code == 0:
            assert "EXITED 0" in text, text[-3000:]
            return {k: v.numpy().tobytes() for k, v in tk.load(out).items()}
    raise AssertionError("the job never finished")


@pytest.mark.crash
def test_sigkill_with_live_persistent_workers_then_restart_at_once(jobs, tmp):
    """The killed job's DataLoader workers outlive it for seconds: they must not hold the run's lock."""
    run, log = os.path.join(tmp, "run"), os.path.join(tmp, "job.log")
    pid = jobs.start([run, os.path.join(tmp, "out.tk"), "--workers", "2", "--persistent", "--sleep", "0.01"], log)
    try:
        lines = _tail(log)
        workers = next([int(w) for w in l.split()[1:]] for l in lines if l.startswith("WORKERS"))
        next(l for l in lines if l.startswith("COMMITTED"))
    finally:
        os.kill(pid, 9)
        jobs.wait(pid)
    assert len(workers) == 2
    alive = [w for w in workers if _io.pid_alive(w)]
    with tk.CheckpointManager(run) as mgr:  # no sleep: a supervisor restarts the job at once
        assert mgr.latest_step() >= 5
    assert alive, "the workers were gone before the restart: this test did not test anything"


TOTAL = 3 * 12  # worker_job: 3 epochs of 12 batches


def _random_kill(resumed: int, rnd: random.Random):
    return (rnd.choice(["STEP", "SAVING"]), rnd.randint(resumed + 1, TOTAL - 1)) if resumed < TOTAL - 1 else None


@pytest.mark.crash
@pytest.mark.parametrize("layout", LAYOUTS)
def test_killed_training_with_augmenting_workers_resumes_bit_exactly(jobs, tmp, layout):
    args = [*LAYOUTS[layout], "--seeding", "sample"]
    ref = _run(jobs, tmp, "ref", args, lambda resumed, rnd: None)
    rnd = random.Random(sizes.kill_seed + len(layout))
    left, landed = [sizes.worker_kill_trials], []

    def kills(resumed, rnd):
        plan = _random_kill(resumed, rnd) if left[0] > 0 else None
        left[0] -= plan is not None
        return plan

    assert _run(jobs, tmp, "killed", args, kills, rnd, landed) == ref
    # A kill planned near the end can miss (the job exits first, or resumed at the last step):
    # what matters is that the job really was killed and still matched.
    assert landed, "no kill landed: this test did not test anything"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_sample_seeds_only_zero_workers_resume_exactly(jobs, tmp, layout):
    args = [*LAYOUTS[layout], "--seeding", "none"]
    ref = _run(jobs, tmp, "ref", args, lambda resumed, rnd: None)
    once = [True]

    def kills(resumed, rnd):  # once, after the checkpoint of step 15 (mid-epoch: 15 = 12 + 3)
        plan, once[0] = (("STEP", 16) if once[0] else None), False
        return plan

    resumed = _run(jobs, tmp, "killed", args, kills)
    assert (resumed == ref) == (layout == "0 workers")


def test_doctests():
    import doctest

    from tensorkeep.checkpoint import seeding

    assert doctest.testmod(seeding).failed == 0
