import functools
import os
import sys

import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=int(os.environ.get("TK_HYPOTHESIS_EXAMPLES", "100")), deadline=None)
settings.load_profile("ci")

# ---------------------------------------------------------------------------------------------
# Loading audit: while any tensorkeep read is running, these audit events must never fire.
# (sys.addaudithook cannot be removed, so it is installed once and switched by a depth counter.)
WATCHED = {"pickle.find_class", "exec", "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn"}
_depth = [0]
_events: list[tuple[str, str]] = []


def _hook(event, args):
    if _depth[0] and event in WATCHED:
        _events.append((event, repr(args)[:200]))


sys.addaudithook(_hook)


def _audited(fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        _depth[0] += 1
        try:
            return fn(*a, **kw)
        finally:
            _depth[0] -= 1

    return wrapper


@pytest.fixture(autouse=True)
def loading_audit(monkeypatch):
    """Every load in every test runs under the audit hook; any watched event fails the test."""
    import tensorkeep.file.reader as files

    monkeypatch.setattr(files._Reader, "__init__", _audited(files._Reader.__init__))
    monkeypatch.setattr(files, "_torch_file", _audited(files._torch_file))
    monkeypatch.setattr(files._Reader, "read_all", _audited(files._Reader.read_all))
    monkeypatch.setattr(files._Reader, "map_all", _audited(files._Reader.map_all))
    monkeypatch.setattr(files._Reader, "map_one", _audited(files._Reader.map_one))  # open().get(lazy=True)
    monkeypatch.setattr(files._Reader, "read", _audited(files._Reader.read))  # open().get()
    monkeypatch.setattr(files._Reader, "build", _audited(files._Reader.build))
    del _events[:]
    yield
    assert not _events, f"code ran while loading: {_events}"


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
