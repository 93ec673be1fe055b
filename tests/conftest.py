import os
import sys

import pytest
from hypothesis import settings

from tensorkeep.file.audit import reading

# The tests live in folders by layer (core, file, checkpoint, distributed, cli, crash, integration);
# the helper scripts they share (ranks.py, crashsim.py, train_job.py, ... and support.py, which
# says where they are) stay here, in tests/, which is put on sys.path for every folder.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

settings.register_profile("ci", max_examples=int(os.environ.get("TK_HYPOTHESIS_EXAMPLES", "100")), deadline=None)
settings.load_profile("ci")

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
