"""Whether tensorkeep is reading a file right now: the hook that lets a test (or a cautious user)
check, with ``sys.addaudithook``, that loading never runs code — no ``pickle.find_class``, no
``exec``, no subprocess while :func:`reading` says True.

>>> reading()
False
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
_depth = [0]


def reading() -> bool:
    """True while a tensorkeep read (header parsing, tensor reads, a torch file's load) runs."""
    return _depth[0] > 0


def audited(fn: F) -> F:
    """Mark ``fn`` as a read: :func:`reading` is True while it runs."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        _depth[0] += 1
        try:
            return fn(*a, **kw)
        finally:
            _depth[0] -= 1

    return wrapper  # type: ignore[return-value]
