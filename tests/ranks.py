"""Test scenarios on several real processes: gloo on the CPU, a file:// rendezvous, loopback only.

Parent side, :func:`run`: start ``world`` processes of a worker script and return what each rank
saw. Worker side, :func:`worker_main`: ``python WORKER SCENARIO RANK WORLD STORE_FILE OUT_DIR DATA_DIR``
joins the group, runs the scenario and writes OUT_DIR/rank{R}.json (its results) or
OUT_DIR/rank{R}.err (a traceback). :func:`failing_write` makes one rank's save fail mid-write.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

import pytest

from tensorkeep.storage import local as _io

HERE = os.path.dirname(os.path.abspath(__file__))
_out_dir = ""


def run(
    worker: str, scenario: str, world: int, data: str, exits: dict[int, int] | None = None, timeout_s: float = 120
) -> list[dict]:
    """Run ``world`` ranks of ``worker``; return each rank's results. ``exits``: rank -> expected exit code."""
    exits = exits or {}
    out = os.path.join(data, f"out-{scenario}")
    os.makedirs(out)
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=HERE)
    procs, logs = [], []
    for r in range(world):
        log = open(os.path.join(out, f"rank{r}.log"), "w")
        logs.append(log)
        args = [sys.executable, worker, scenario, str(r), str(world), os.path.join(out, "store"), out, data]
        procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"scenario {scenario} hung for {timeout_s} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    errors = [open(os.path.join(out, n)).read() for n in sorted(os.listdir(out)) if n.endswith(".err")]
    assert not errors, "\n".join(errors)
    codes = [p.returncode for p in procs]
    assert codes == [exits.get(r, 0) for r in range(world)], (codes, [open(l.name).read()[-3000:] for l in logs])
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]


def save(out: dict, rank: int) -> None:
    """Write this rank's results now (a scenario that ends by killing itself calls this first)."""
    with open(os.path.join(_out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


def worker_main(scenarios: dict[str, Callable[[int, int, str, dict], None]]) -> None:
    """The ``__main__`` of a worker script: ``scenarios[name](rank, world, data_dir, out)``."""
    global _out_dir
    import torch.distributed as dist

    scenario, rank, world, store, _out_dir, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]
    out: dict = {}
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30)
        )
        scenarios[scenario](rank, world, data, out)
        save(out, rank)
    except BaseException:
        with open(os.path.join(_out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        sys.stdout.flush()
        os._exit(1)
    os._exit(0)  # no destroy_process_group: after a rank died the group cannot shut down cleanly


def failing_write(after_bytes: int, action: str) -> Callable[[int, memoryview, int], None]:
    """A replacement for ``_io.pwrite_all`` that fails once past ``after_bytes``: ENOSPC
    (``"raise"``), SIGKILL (``"sigkill"``) or ``os._exit(17)`` (``"exit"``)."""
    real, written = _io.pwrite_all, [0]

    def pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
        if written[0] + len(buf) > after_bytes:
            real(fd, buf[: max(0, after_bytes - written[0])], offset)
            if action == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if action == "exit":
                os._exit(17)
            raise OSError(errno.ENOSPC, "No space left on device")
        written[0] += len(buf)
        real(fd, buf, offset)

    return pwrite_all


def failed_save(save_fn: Callable[[], object], rank: int, culprit: int, after_bytes: int, action: str) -> str:
    """Run ``save_fn`` with rank ``culprit`` failing mid-write (see :func:`failing_write`);
    return the ``SaveError`` this rank saw (every rank must see one)."""
    import tensorkeep as tk

    real = _io.pwrite_all
    if rank == culprit:
        _io.pwrite_all = failing_write(after_bytes, action)
    try:
        save_fn()
    except tk.SaveError as e:
        return str(e)
    finally:
        _io.pwrite_all = real
    raise AssertionError("the save did not fail")
