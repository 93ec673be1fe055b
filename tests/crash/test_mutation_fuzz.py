"""Mutation fuzzing of tk.load / tk.open at scale (harness: tests/fuzz_mutation.py, inputs: tests/fuzz_inputs.py).

--mutation-inputs (default 200000) inputs run in 2 worker processes, each under RLIMIT_AS and a
per-input alarm; --mutation-stream (default 0) picks another sequence of inputs. Failing inputs
are saved, with how they were made, under the directory the failure message names.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import fuzz_mutation as fm
import tensorkeep as tk
from fuzz_inputs import Case, make_seeds
from support import TESTS_DIR, sizes
from tensorkeep.file import reader as files

pytestmark = pytest.mark.crash


@pytest.mark.fuzz
@pytest.mark.slow
def test_mutated_files_are_refused_cleanly_or_load_exactly(tmp_path):
    out = tmp_path / "failures"
    inputs = sizes.mutation_inputs
    summary = fm.run(inputs, str(out), workers=2, stream=sizes.mutation_stream)
    print(json.dumps(summary))
    assert summary["failures"] == 0, (
        f"{summary['failures']} failing inputs; saved under {out} ({summary['saved'][:5]} ...; each with a .txt "
        f"saying how it was made); workers that died: {summary['dead']}. Reproduce one with "
        "`python tests/fuzz_mutation.py --check FILE`."
    )
    assert summary["inputs"] == inputs
    seen = summary["outcomes"]
    kinds = ("accepted:plain", "accepted:tk-forged", "refused:FormatError", "refused:ChecksumError")
    if inputs >= 20_000:  # the oracle was not vacuous: every kind of verdict was reached
        assert all(seen.get(k, 0) > 0 for k in kinds + ("accepted:tk-seed",)), seen
    assert sum(seen.values()) == inputs


# ---------------------------------------------------------------------------- the oracle has teeth


@pytest.fixture
def harness(tmp, monkeypatch):
    """Seeds, an input path and the per-input alarm, in this process."""
    previous = signal.signal(signal.SIGALRM, fm._on_alarm)
    yield make_seeds(tmp), os.path.join(tmp, "input.safetensors")
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def seed_named(seeds, name: str) -> tuple[int, bytes]:
    i = next(i for i, s in enumerate(seeds) if s.name == name)
    return i, seeds[i].data


def test_oracle_catches_a_loader_that_skips_checksums(harness, monkeypatch):
    seeds, path = harness
    i, data = seed_named(seeds, "tk-nested")
    damaged = bytearray(data)
    damaged[-1] ^= 1  # the last byte of the data area
    case = Case(bytes(damaged), i, ["flip"], False)
    assert fm.check_case(case, path, seeds, "load", 5.0)[0] == "refused:ChecksumError"
    monkeypatch.setattr(
        files._Reader,
        "read_verified",
        lambda self, name, buf, first, verify: self.read_range(
            buf, self.header.data_start + self.header.tensors[name].begin + first * self.block
        ),
    )
    outcome, detail = fm.check_case(case, path, seeds, "load", 5.0)
    assert outcome == "wrong" and "checksums do not match" in detail, detail


def test_oracle_catches_a_wrong_tensor(harness, monkeypatch):
    seeds, path = harness
    i, data = seed_named(seeds, "st-mixed")
    real = tk.load
    monkeypatch.setattr(tk, "load", lambda p, **kw: {k: v + 1 if k == "a" else v for k, v in real(p, **kw).items()})
    outcome, detail = fm.check_case(Case(data, i, [], False), path, seeds, "load", 5.0)
    assert outcome == "wrong" and "obj['a']" in detail, detail


def test_oracle_catches_loaders_that_disagree(harness, monkeypatch):
    seeds, path = harness
    i, data = seed_named(seeds, "tk-mixed")
    monkeypatch.setattr(files._Reader, "map_all", lambda self, verify: (_ for _ in ()).throw(tk.ChecksumError("x")))
    outcome, detail = fm.check_case(Case(data, i, [], False), path, seeds, "load", 5.0)
    assert outcome == "wrong" and "lazy raised what load accepted" in detail, detail


@pytest.mark.parametrize(
    "fault, expected",
    [
        (KeyError("dtype"), "uncaught"),
        (MemoryError(), "memory"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory"), "memory"),
        ("sleep", "hang"),
    ],
)
def test_failure_kinds(harness, monkeypatch, fault, expected):
    seeds, path = harness
    i, data = seed_named(seeds, "st-one")

    def broken(*a, **kw):
        if fault == "sleep":
            time.sleep(10)
        raise fault

    monkeypatch.setattr(files, "parse_header", broken)
    outcome, detail = fm.check_case(Case(data, i, ["x"], False), path, seeds, "open", 0.2)
    assert outcome == expected, detail


def test_memory_limit_is_real():
    """The workers' limit: an allocation past it is a MemoryError (which check_case reports), not an OOM kill."""
    code = (
        f"import sys, numpy; sys.path.insert(0, {TESTS_DIR!r}); import fuzz_mutation as fm; fm.limit_memory(64 << 20)\n"
        "try:\n    numpy.ones(256 << 20, numpy.uint8)\nexcept MemoryError:\n    print('MemoryError')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "MemoryError", r.stdout + r.stderr


def test_a_stalled_worker_is_killed_and_its_input_kept(tmp_path):
    """A hang the alarm cannot interrupt (in C code): with no stall allowed, the worker is killed at once."""
    summary = fm.run(100_000, str(tmp_path), workers=1, stall_s=0.0)
    assert summary["failures"] == 1 and summary["inputs"] == 0, summary
    assert "exited with -9" in summary["dead"][0] and (tmp_path / "died-worker0.safetensors").exists()


def test_seeds_load_exactly():
    """The seeds the mutations start from cover what the brief asks for, and load back exactly."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        seeds = make_seeds(d)
        tk_seeds = [s for s in seeds if s.is_tk]
        assert len(tk_seeds) >= 4 and len(seeds) - len(tk_seeds) >= 3
        for s in tk_seeds:
            p = os.path.join(d, s.name)
            assert fm.deep_diff(tk.load(p), s.obj) is None, s.name
        dtypes = {str(t.dtype) for s in seeds if not s.is_tk for t in s.obj.values()}
        assert {"torch.bfloat16", "torch.float8_e5m2", "torch.bool", "torch.complex64"} <= dtypes
        shapes = [tuple(t.shape) for s in seeds if not s.is_tk for t in s.obj.values()]
        assert () in shapes and any(0 in sh for sh in shapes)
        assert torch.equal(tk.load(os.path.join(d, "tk-tensor")), torch.arange(4, dtype=torch.int32))


def test_inputs_are_reproducible(tmp):
    """STREAM:INDEX names one input: the seeds, hence every input, are the same bytes in every process."""
    code = (
        f"import hashlib, sys, tempfile; sys.path.insert(0, {TESTS_DIR!r}); import fuzz_inputs as fi\n"
        "print(*[hashlib.sha256(s.data).hexdigest() for s in fi.make_seeds(tempfile.mkdtemp())])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    seeds = make_seeds(tmp)
    assert r.stdout.split() == [hashlib.sha256(s.data).hexdigest() for s in seeds]
    assert fm.generate(3, 99, seeds) == fm.generate(3, 99, seeds)
