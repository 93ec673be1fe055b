"""The reader's threads: started once per process, not once per read.

Starting two threads costs about as much as reading a few MB from the page cache, so a pool made
for every ``load()`` or ``get()`` would cost a small read more than its work. This one lives as
long as the process (a forked child makes its own: threads do not survive ``fork``), and it is
resized when ``knobs.IO_THREADS`` changes.

>>> run_all([lambda: 1, lambda: 2])
[1, 2]
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tensorkeep import knobs, threads

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_size = 0
_inside = threading.local()  # set in the pool's own threads


def _mark() -> None:
    _inside.yes = True


def _get() -> ThreadPoolExecutor | None:
    global _pool, _size
    n = knobs.IO_THREADS
    if n < 2:
        return None
    with _lock:
        if _pool is None or _size != n:
            old, _pool, _size = _pool, ThreadPoolExecutor(n, "tk-io", initializer=_mark), n
            if old is not None:
                old.shutdown(wait=False)
        return _pool


def run_all(tasks: list[Callable[[], Any]]) -> list[Any]:
    """Run ``tasks`` on the pool and return their results in order (the first error is raised,
    after every task has finished, so no task still writes into a buffer the caller gives up).
    Inline when there is one task, one thread, or the caller is itself one of the pool's threads
    (waiting on the pool from inside it could wait forever)."""
    pool = _get() if len(tasks) > 1 and not getattr(_inside, "yes", False) else None
    if pool is None:
        return [t() for t in tasks]
    futures = [threads.submit(pool, t) for t in tasks[1:]]  # inline if the pool takes no more work (exit)
    first: Any = None
    error: BaseException | None = None
    try:  # the caller does the first task itself rather than sleep: one thread handoff fewer
        first = tasks[0]()
    except BaseException as caught:
        error = caught
    for problem in [error, *(f.exception() for f in futures)]:
        if problem is not None:
            raise problem
    return [first, *(f.result() for f in futures)]


def _forget_in_child() -> None:
    global _lock, _pool, _size
    _lock, _pool, _size = threading.Lock(), None, 0  # a parent's thread may have held the lock


os.register_at_fork(after_in_child=_forget_in_child)
