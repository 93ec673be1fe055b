"""Fixtures and options every test folder shares: campaign sizes, the loading audit, tmp, fsync_calls."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest
from hypothesis import settings

from tensorkeep.file.audit import reading

# The tests live in folders by layer (core, file, checkpoint, distributed, cli, crash, integration);
# the helper scripts they share (ranks.py, crashsim.py, train_job.py, ... and support.py, which
# says where they are) stay here, in tests/, which is put on sys.path for every folder.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

from support import sizes  # noqa: E402  (tests/ must be on sys.path first)

# ---------------------------------------------------------------------------------------------
# Campaign sizes: `make test` runs the standard ones, `make test-long` (pytest --long) the long
# ones. Each option sets one size; without it, its old TK_* environment variable does, then --long.
# Tests read them as support.sizes.<name> (or the `sizes` fixture), e.g. sizes.kill_trials.
#
#   option                 old variable             standard  --long    what it sets
#   --property-examples N  TK_HYPOTHESIS_EXAMPLES   100       1000      examples of each hypothesis test without its own max_examples
#   --fuzz-examples N      TK_FUZZ_EXAMPLES         10000     100000    generated headers thrown at the parser (core/test_format.py)
#   --ownership-examples N TK_OWNERSHIP_EXAMPLES    25        250       foreign directory trees per operation (checkpoint/test_ownership.py)
#   --corruption-bits B    TK_CORRUPTION_BITS       all       all       "all": flip every bit of the small file, "byte": one per byte (file/test_corruption.py)
#   --corruption-samples N TK_CORRUPTION_SAMPLES    300       3000      damaged positions in the large file (file/test_corruption.py)
#   --crash-samples N      TK_CRASH_SAMPLES         2000      20000     power-cut states sampled per scenario (crash/test_power_loss.py)
#   --kill-trials N        TK_KILL_TRIALS           20        200       kill -9 of a saving job (crash/test_checkpoint_crash.py)
#   --async-kill-trials N  TK_ASYNC_KILL_TRIALS     8         80        kill -9 during async saves (checkpoint/test_checkpoint_async.py)
#   --worker-kill-trials N TK_WORKER_KILL_TRIALS    3         30        kills per training run with DataLoader workers (integration/test_worker_augmentation.py)
#   --kill-seed N          TK_KILL_SEED             1234      1234      seed of the kill moments (crash/test_checkpoint_crash.py, integration/test_worker_augmentation.py)
#   --strace-points N      TK_STRACE_POINTS         2         0         system calls failed or killed at, spread over all (0: every one) (crash/test_fault_injection.py)
#   --strace-full          TK_STRACE_FULL=1         off       on        also inject into every pwrite64, and EIO besides ENOSPC (crash/test_fault_injection.py)
#   --mutation-inputs N    TK_MUTATION_INPUTS       200000    2000000   damaged files through tk.load / tk.open (crash/test_mutation_fuzz.py)
#   --mutation-stream N    TK_MUTATION_STREAM       0         0         which sequence of damaged files (crash/test_mutation_fuzz.py)
#
# Markers (pyproject.toml, --strict-markers): crash, fuzz, slow. While editing, for example:
#   .venv/bin/python -m pytest tests -m "not slow and not crash"


@dataclass(frozen=True)
class Size:
    """One campaign size: ``--option``, the environment variable it replaces, its two presets."""

    option: str
    env: str
    standard: int | str | bool
    long: int | str | bool
    help: str

    @property
    def name(self) -> str:
        return self.option.replace("-", "_")


SIZES = (
    Size("property-examples", "TK_HYPOTHESIS_EXAMPLES", 100, 1000, "hypothesis examples per property test"),
    Size("fuzz-examples", "TK_FUZZ_EXAMPLES", 10_000, 100_000, "generated headers thrown at the parser"),
    Size("ownership-examples", "TK_OWNERSHIP_EXAMPLES", 25, 250, "foreign directory trees per operation"),
    Size(
        "corruption-bits",
        "TK_CORRUPTION_BITS",
        "all",
        "all",
        "all: flip every bit of the small file; byte: one per byte",
    ),
    Size("corruption-samples", "TK_CORRUPTION_SAMPLES", 300, 3000, "damaged positions in the large file"),
    Size("crash-samples", "TK_CRASH_SAMPLES", 2000, 20_000, "power-cut states sampled per scenario"),
    Size("kill-trials", "TK_KILL_TRIALS", 20, 200, "kill -9 of a saving job"),
    Size("async-kill-trials", "TK_ASYNC_KILL_TRIALS", 8, 80, "kill -9 during async saves"),
    Size("worker-kill-trials", "TK_WORKER_KILL_TRIALS", 3, 30, "kills per training run with DataLoader workers"),
    Size("kill-seed", "TK_KILL_SEED", 1234, 1234, "seed of the kill moments"),
    Size("strace-points", "TK_STRACE_POINTS", 2, 0, "system calls to fail or kill at (0: every one)"),
    Size("strace-full", "TK_STRACE_FULL", False, True, "also every pwrite64, and EIO besides ENOSPC"),
    Size("mutation-inputs", "TK_MUTATION_INPUTS", 200_000, 2_000_000, "damaged files through tk.load / tk.open"),
    Size("mutation-stream", "TK_MUTATION_STREAM", 0, 0, "which sequence of damaged files"),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tensorkeep", "campaign sizes (the table in tests/conftest.py)")
    group.addoption("--long", action="store_true", help="the long sizes (make test-long): 10x the standard ones")
    for s in SIZES:
        text = f"{s.help} (default: ${s.env}, else {s.standard}; --long: {s.long})"
        if isinstance(s.standard, bool):
            group.addoption(f"--{s.option}", action="store_true", default=None, help=text)
        elif isinstance(s.standard, str):
            group.addoption(f"--{s.option}", choices=("all", "byte"), default=None, help=text)
        else:
            group.addoption(f"--{s.option}", type=int, default=None, metavar="N", help=text)


def _size(config: pytest.Config, s: Size) -> int | str | bool:
    """The option if given, else the old environment variable if set, else the preset."""
    given = config.getoption(s.name)
    if given is not None:
        return given
    env = os.environ.get(s.env)
    if env is not None:
        return env == "1" if isinstance(s.standard, bool) else type(s.standard)(env)
    return s.long if config.getoption("long") else s.standard


def pytest_configure(config: pytest.Config) -> None:
    """Fill support.sizes and the hypothesis profile before any test module is imported."""
    for s in SIZES:
        setattr(sizes, s.name, _size(config, s))
    settings.register_profile("tensorkeep", max_examples=sizes.property_examples, deadline=None)
    settings.load_profile("tensorkeep")


@pytest.fixture(name="sizes")
def sizes_fixture():
    """The campaign sizes (support.sizes), for a test that prefers a fixture to an import."""
    return sizes


# ---------------------------------------------------------------------------------------------
# Loading audit: while tensorkeep reads a file (tensorkeep.file.audit.reading()), these audit events
# must never fire. (sys.addaudithook cannot be removed, so it is installed once for the session.)
WATCHED = {"pickle.find_class", "exec", "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn"}
_events: list[tuple[str, str]] = []


def _hook(event, args):
    if event in WATCHED and reading():
        _events.append((event, repr(args)[:200]))


sys.addaudithook(_hook)


@pytest.fixture(autouse=True)
def loading_audit():
    """Every load in every test runs under the audit hook; any watched event fails the test."""
    del _events[:]
    yield
    assert not _events, f"code ran while loading: {_events}"


@pytest.fixture
def audit_events() -> list[tuple[str, str]]:
    """The watched audit events seen while loading, so far in this test (tests/file/test_audit.py)."""
    return _events


@pytest.fixture
def tmp(tmp_path):
    """A temporary directory as a str."""
    return str(tmp_path)


@pytest.fixture
def fsync_calls(monkeypatch):
    """Every fsync from now on, as "file" or "dir", in order; none reaches the disk."""
    from tensorkeep.storage import local as _io

    calls: list[str] = []
    monkeypatch.setattr(_io, "fsync", lambda fd: calls.append("file"))
    monkeypatch.setattr(_io, "fsync_dir", lambda path: calls.append("dir"))
    return calls
