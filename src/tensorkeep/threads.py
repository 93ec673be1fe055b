"""Thread pools that keep working while the interpreter exits.

Once Python starts shutting down (before ``atexit`` handlers run, while it joins the threads still
running) every ``ThreadPoolExecutor`` refuses new work: "cannot schedule new futures after
interpreter shutdown". A save still in flight when a script ends (an asynchronous checkpoint, the
last ``trainer.save_checkpoint``) would then fail halfway. :func:`submit` and :func:`map` run the
work on the caller's thread instead, so such a save finishes, only without the extra thread.

>>> from concurrent.futures import ThreadPoolExecutor
>>> with ThreadPoolExecutor(1) as pool: print(submit(pool, sum, [1, 2]).result(), map(pool, abs, [-1, 2]))
3 [1, 2]
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")


def submit(pool: Executor, fn: Callable[..., T], *args: Any) -> Future[T]:
    """``pool.submit(fn, *args)``, or ``fn(*args)`` run now when the pool takes no more work."""
    try:
        return pool.submit(fn, *args)
    except RuntimeError as e:
        if "cannot schedule new futures" not in str(e):
            raise
    done: Future[T] = Future()
    try:
        done.set_result(fn(*args))
    except BaseException as e:  # delivered through the future, as the pool would
        done.set_exception(e)
    return done


def map(pool: Executor, fn: Callable[[Any], T], items: Iterable[Any]) -> list[T]:
    """``list(pool.map(fn, items))`` that runs what the pool refuses on the caller's thread; every
    task has ended when it returns or raises (the first error is raised)."""
    futures = [submit(pool, fn, x) for x in items]
    errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e
    return builtins.list(f.result() for f in futures)
