"""`make demo` tells its story and proves the resume was exact, or says plainly why it could not."""

import os
import subprocess
import sys

import pytest

from tensorkeep import demo
from tensorkeep.checkpoint import determinism


@pytest.mark.slow
def test_demo_runs_and_resume_is_exact(tmp):
    r = subprocess.run(
        [sys.executable, "-m", "tensorkeep.demo", "--dir", tmp], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout
    assert "SIGKILL" in out and "resuming from there" in out
    assert "ARE bit-identical" in out
    assert "Rolling back" in out and "hidden1.weight" in out


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to run with one and with two")
@pytest.mark.slow
def test_the_training_computes_the_same_bits_on_one_cpu_and_on_all(tmp):
    """torch's thread count follows the CPUs a process may use, and it changes the rounding of sums;
    the demo's training pins it, so a process on one CPU and one on all of them agree bit for bit."""
    env = {k: v for k, v in os.environ.items() if k not in determinism.ENV_VARS}
    one_cpu = {min(os.sched_getaffinity(0))}
    lines = []
    for i, cpus in enumerate([one_cpu, None]):
        run, out = os.path.join(tmp, f"run{i}"), os.path.join(tmp, f"out{i}.tk")
        r = subprocess.run(
            [sys.executable, "-m", "tensorkeep.demo", "--train", run, out, "--epochs", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        lines.append([l for l in r.stdout.splitlines() if l.startswith("COMMITTED")])
    assert lines[0] == lines[1] and len(lines[0]) == 1, lines


def job(settings=None, resumed=None, **epochs):
    s = settings or {"threads": 1, "torch": "2.13.0"}
    return demo.Job(s, resumed, {int(k[1:]): v for k, v in epochs.items()}, 0)


SAME = dict(e1=("0.4", "a1"), e2=("0.2", "a2"), e3=("0.1", "a3"))


def never():
    raise AssertionError("the reference was run again although the answer was known")


def test_diagnose_blames_the_machine_when_two_runs_differ_before_any_kill():
    first, ref = job(e1=("0.4044", "x1"), e2=("0.2", "x2")), job(**SAME)
    code, why = demo.diagnose(first, job(resumed=(2, "a2"), e3=("0.1", "a3")), ref, never)
    assert code == 3
    assert "the arithmetic of this machine was not reproducible" in why and "epoch 1, before any kill" in why
    assert "val_loss 0.4044 vs 0.4" in why and "not a resume problem" in why


def test_diagnose_names_settings_that_differ():
    first = job({"threads": 2, "torch": "2.13.0"}, None, e1=("0.4044", "x1"))
    code, why = demo.diagnose(first, job(), job(**SAME), never)
    assert code == 3 and "settings differed: torch threads: first run 2, reference 1" in why
    code, why = demo.diagnose(job(e1=SAME["e1"]), job({"threads": 2}, (1, "a1")), job(**SAME), never)
    assert code == 3 and "torch threads: resumed run 2, reference 1" in why and "not a resume problem" in why


def test_diagnose_blames_the_resume_when_the_restored_state_differs():
    code, why = demo.diagnose(job(e1=SAME["e1"], e2=SAME["e2"]), job(resumed=(2, "zz")), job(**SAME), never)
    assert code == 1 and "resume was not exact" in why and "epoch 2" in why


def test_diagnose_runs_the_reference_again_when_only_later_epochs_differ():
    first, second = job(e1=SAME["e1"]), job(resumed=(1, "a1"), e2=("0.2", "a2"), e3=("0.1", "zz"))
    code, why = demo.diagnose(first, second, job(**SAME), lambda: job(e1=SAME["e1"], e2=("0.21", "b2")))
    assert code == 3 and "the uninterrupted run, run twice, differed at epoch 2" in why
    code, why = demo.diagnose(first, second, job(**SAME), lambda: job(**SAME))
    assert code == 1 and "resume was not exact" in why and "epoch 3 then differed" in why
