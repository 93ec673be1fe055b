"""The committed checkpoints a manager knows of, with their metrics (what retention looks at)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from tensorkeep.checkpoint.policies import Record


class Records:
    """Step -> :class:`Record`, safe to use from the training thread and a background writer.

    >>> r = Records(); r.set(3, {"loss": 0.5}); r.set(1, {}); r.steps()
    [1, 3]
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_step: dict[int, Record] = {}

    def set(self, step: int, metrics: Mapping[str, Any]) -> None:
        with self._lock:
            self._by_step[step] = Record(step, metrics)

    def drop(self, step: int) -> None:
        with self._lock:
            self._by_step.pop(step, None)

    def steps(self) -> list[int]:
        with self._lock:
            return sorted(self._by_step)

    def all(self) -> list[Record]:
        with self._lock:
            return list(self._by_step.values())

    def metrics(self, step: int) -> dict[str, Any]:
        with self._lock:
            return dict(self._by_step[step].metrics)
