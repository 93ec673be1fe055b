"""Forked children (DataLoader workers, multiprocessing with fork, os.fork) never hold a run's lock.

A child inherits the lock's descriptor; an flock lives as long as any descriptor on its open
file description, so a child alive after its parent's SIGKILL used to refuse the restart.
A real training job with live persistent DataLoader workers, killed and restarted at once, is in
test_worker_augmentation.py (it shares that file's pre-imported job server).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import tensorkeep as tk
from tensorkeep.checkpoint.lock import LOCK_NAME
from tensorkeep.storage import local as _io

PY = sys.executable
HANG = 120  # seconds: only to turn a hang into a failure


def _lines_until(p: subprocess.Popen, word: str) -> list[str]:
    seen = []
    for line in p.stdout:
        seen.append(line.rstrip("\n"))
        if line.startswith(word):
            return seen
    raise AssertionError(f"no {word} line: {seen} {p.stderr.read()[-3000:]}")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# The parent opens a run with a save in flight (async_save="lazy", its copy held back), then forks:
# child A uses the manager it inherited and exits normally (atexit, finalizers); child B just lives.
PARENT = textwrap.dedent("""
    import json, os, sys, threading, time, torch, tensorkeep as tk
    from tensorkeep.checkpoint import snapshot

    run = sys.argv[1]
    go = threading.Event()
    copy = snapshot.Staging.copy_deferred
    snapshot.Staging.copy_deferred = lambda self: (go.wait(), copy(self))[1]  # the save stays in flight
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    mgr = tk.CheckpointManager(run, async_save="lazy")
    state = {"model": net, "optimizer": opt}
    mgr.save(5, state)

    a = os.fork()
    if a == 0:  # child A
        out = {}
        for name, call in [("save", lambda: mgr.save(6, state)), ("restore", lambda: mgr.restore(state)),
                           ("prune", lambda: mgr.prune()), ("wait", mgr.wait)]:
            try:
                call()
                out[name] = "no error"
            except tk.TensorkeepError as e:
                out[name] = str(e)
        net(torch.ones(1, 2)).sum().backward()
        opt.step()  # the parent's lazy copy is not this process's business: must not wait for it
        mgr.close()  # detaches: must neither release the parent's lock nor wait for its save
        print("CHILD", json.dumps(out), flush=True)
        sys.exit(0)  # a normal exit: atexit hooks and finalizers run here too
    for _ in range(600):
        if os.waitpid(a, os.WNOHANG)[0]:
            break
        time.sleep(0.2)
    else:
        print("CHILD HUNG", flush=True)
        os.kill(a, 9)
    go.set()
    mgr.wait()
    print("SAVED", mgr.steps(), flush=True)
    b = os.fork()
    if b == 0:  # child B: outlives the parent
        time.sleep(600)
        os._exit(0)
    print("READY", b, flush=True)
    time.sleep(600)
""")


@pytest.mark.slow
def test_a_forked_child_neither_keeps_nor_releases_the_lock_and_cannot_use_the_manager(tmp):
    run = os.path.join(tmp, "run")
    p = subprocess.Popen([PY, "-c", PARENT, run], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child_b = None
    try:
        lines = _lines_until(p, "READY")
        assert "CHILD HUNG" not in lines, lines
        child = json.loads(next(l for l in lines if l.startswith("CHILD"))[len("CHILD ") :])
        for name in ("save", "restore", "prune", "wait"):
            assert f"belongs to process {p.pid}, not to this one" in child[name], (name, child[name])
            assert run in child[name]
        assert "SAVED [5]" in lines, lines
        child_b = int(lines[-1].split()[1])

        # child A's close() and exit did not release the parent's lock
        with open(os.path.join(run, LOCK_NAME)) as f:
            assert json.load(f)["pid"] == p.pid
        with pytest.raises(tk.LockedError, match=f"in use by process {p.pid}"):
            tk.CheckpointManager(run)

        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=HANG)
        assert _io.pid_alive(child_b)  # still holds a copy of every other descriptor of its parent
        with tk.CheckpointManager(run) as mgr:  # at once: no LockedError
            net = torch.nn.Linear(2, 2)
            assert mgr.restore({"model": net}) == 5
        assert _io.pid_alive(child_b)
    finally:
        _kill(p.pid)
        if child_b:
            _kill(child_b)
        p.communicate()


def test_a_forked_child_keeps_no_descriptor_of_the_lock(tmp):
    run = os.path.join(tmp, "run")
    mgr = tk.CheckpointManager(run)
    lock = os.path.realpath(os.path.join(run, LOCK_NAME))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # report which files the child has open, and exit without any cleanup
        try:
            fds = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
            os.write(w, json.dumps(sorted(fds)).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        child_fds = json.loads(f.read())
    os.waitpid(pid, 0)
    assert lock not in child_fds
    with pytest.raises(tk.LockedError, match="already open by another CheckpointManager in this process"):
        tk.CheckpointManager(run)  # the parent's lock survived the child closing its copy
    mgr.close()
    tk.CheckpointManager(run).close()


def test_a_forked_child_is_not_preempted_by_the_parents_signal_handler(tmp):
    """save_on_signal's handler only records the signal: in a child (a multiprocessing worker that
    pool.terminate() stops with SIGTERM) it must not swallow it."""
    # the action before ours is the default one, whatever an earlier test in this worker installed
    # (Lightning's Trainer leaves a SIGTERM handler of its own)
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        _child_gets_its_own_sigterm(tmp)
    finally:
        signal.signal(signal.SIGTERM, before)


def _child_gets_its_own_sigterm(tmp: str) -> None:
    with tk.CheckpointManager(os.path.join(tmp, "run")) as mgr:
        mgr.save_on_signal({"x": 1})
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.write(w, b"!")  # a signal that arrives before the child's Python runs is dropped by CPython
                deadline = time.monotonic() + HANG
                while time.monotonic() < deadline:
                    time.sleep(0.01)
            finally:
                os._exit(7)
        os.read(r, 1)
        os.close(r), os.close(w)
        os.kill(pid, signal.SIGTERM)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == -signal.SIGTERM
        assert not mgr.preempted
