"""checkpoint/determinism.py: what a bit-exact resume depends on, recorded and compared."""

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from support import script
from tensorkeep.checkpoint import determinism as det


def test_capture_is_plain_json_and_matches_itself():
    d = det.capture(["cpu"])
    assert json.loads(json.dumps(d)) == d
    assert d["threads"] == torch.get_num_threads() and d["torch"] == torch.__version__
    assert d["devices"] == ["cpu"] and set(d["env"]) == set(det.ENV_VARS)
    assert det.differences(json.loads(json.dumps(d)), det.capture(["cpu"])) == []
    assert det.differences(d) == []  # devices are compared only when both sides name some


def test_capture_returns_a_copy_of_what_it_caches():
    det.capture()["env"]["OMP_NUM_THREADS"] = "99"
    det.capture().update(torch="0.0")
    assert det.capture()["env"]["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS")
    assert det.capture()["torch"] == torch.__version__


def test_a_changed_thread_count_and_flag_are_named():
    saved = det.capture()
    threads, flag = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.set_num_threads(threads + 1)
        torch.use_deterministic_algorithms(not flag)
        lines = det.differences(saved)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(flag)
    assert f"torch threads: saved with {threads}, now {threads + 1}" in lines
    assert f"torch.use_deterministic_algorithms: saved with {flag}, now {not flag}" in lines
    assert len(lines) == 2, lines


def test_versions_devices_and_environment_are_named():
    now = det.capture(["cpu"])
    other_cpu = "AVX2" if now["cpu_capability"] != "AVX2" else "AVX512"  # differs on any machine
    saved = {
        **now,
        "torch": "2.0.0",
        "numpy": "1.26.4",
        "cpu_capability": other_cpu,
        "devices": ["cuda"],
        "gpus": ["NVIDIA H100"],
        "env": {**now["env"], "OMP_NUM_THREADS": "1", "MKL_DYNAMIC": None},
    }
    current = {**now, "gpus": ["NVIDIA A100"], "env": {**now["env"], "OMP_NUM_THREADS": None, "MKL_DYNAMIC": "FALSE"}}
    assert det.differences(saved, current) == [
        f"torch version: saved with 2.0.0, now {torch.__version__}",
        f"NumPy version: saved with 1.26.4, now {now['numpy']}",
        f"torch CPU kernels (ATen CPU capability): saved with {other_cpu}, now {now['cpu_capability']}",
        "GPUs: saved with [NVIDIA H100], now [NVIDIA A100]",
        "device types of the state: saved with [cuda], now [cpu]",
        "environment variable OMP_NUM_THREADS: saved with 1, now unset",
        "environment variable MKL_DYNAMIC: saved with unset, now FALSE",
    ]


def test_missing_and_malformed_records():
    assert det.differences(None) == []  # recorded by a tensorkeep that recorded nothing
    assert det.differences({}) == []  # nothing recorded: nothing to compare
    assert det.differences({"env": "x"}) == []
    assert det.differences([1, 2]) == [
        "the checkpoint's record of its settings is unreadable (a JSON list, not an object)"
    ]
    now = det.capture()
    lines = det.differences(
        {
            "threads": "two",
            "torch": 10**5000,
            "numpy": {"a": 1},
            "gpus": [1, 2],
            "env": {"OMP_NUM_THREADS": [1], "MKL_NUM_THREADS": "\x1b]0;owned\x07"},
        },
        now,
    )
    assert lines == [
        f"torch version: saved with <int>, now {torch.__version__}",
        f"NumPy version: saved with <dict>, now {now['numpy']}",
        f"torch threads: saved with two, now {now['threads']}",
        f"environment variable OMP_NUM_THREADS: saved with <list>, now {now['env']['OMP_NUM_THREADS'] or 'unset'}",
        f"environment variable MKL_NUM_THREADS: saved with '\\x1b]0;owned\\x07', now {now['env']['MKL_NUM_THREADS'] or 'unset'}",
    ]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=200),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=10), c, max_size=5),
    max_leaves=20,
)
keys = st.sampled_from([*det._LABELS, "env"]) | st.text(max_size=10)
env = st.dictionaries(st.sampled_from(det.ENV_VARS) | st.text(max_size=5), json_values, max_size=8)


@given(st.one_of(json_values, st.dictionaries(keys, json_values | env, max_size=12)))
def test_any_json_gives_printable_lines_and_never_raises(saved):
    lines = det.differences(saved)
    assert isinstance(lines, list)
    for line in lines:
        assert isinstance(line, str) and line.isprintable() and len(line) < 300, line


def test_devices_of_a_state():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert det.devices({"model": model, "optimizer": opt, "epoch": 3, "note": "x"}) == ["cpu"]
    assert det.devices({"model": torch.nn.Linear(2, 2, device="meta"), "t": torch.zeros(1)}) == ["cpu", "meta"]
    assert det.devices({"epoch": 3}) == []


@pytest.mark.slow
def test_pin_and_the_pinned_environment_in_a_child():
    """A child started with PINNED_ENV runs one thread (whatever its CPUs); pin() sets the flags.
    The doctests run there too: they pin, which must not leak into this process."""
    code = (
        "import doctest, json, torch; from tensorkeep.checkpoint import determinism as d; "
        "t = torch.get_num_threads(); f = doctest.testmod(d).failed; "
        "print(json.dumps([t, f, torch.are_deterministic_algorithms_enabled(), d.capture()['env']]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **det.PINNED_ENV}
    )
    assert r.returncode == 0, r.stderr[-3000:]
    threads, failed, deterministic, child_env = json.loads(r.stdout.splitlines()[-1])
    assert (threads, failed, deterministic) == (1, 0, True), r.stdout
    assert {k: child_env[k] for k in det.PINNED_ENV} == det.PINNED_ENV


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to run with one and with two")
@pytest.mark.slow
def test_the_resume_tests_training_job_computes_the_same_bits_on_one_cpu_and_on_all(tmp):
    """tests/train_job.py (the bit-exact resume tests' job) runs pinned: a process on one CPU and a
    process on all of them end with the same weights (unpinned, their thread counts differ, and so do they)."""
    import tensorkeep as tk

    job = script("train_job.py")
    env = {k: v for k, v in os.environ.items() if k not in det.ENV_VARS}
    outs = []
    for i, cpus in enumerate([{min(os.sched_getaffinity(0))}, None]):
        outs.append(os.path.join(tmp, f"out{i}.tk"))
        r = subprocess.run(
            [sys.executable, job, os.path.join(tmp, f"run{i}"), outs[-1], "--epochs", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = tk.load(outs[0]), tk.load(outs[1])
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))]
    assert not differ, differ
