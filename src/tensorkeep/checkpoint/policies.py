"""Retention policies: small pure objects, each deciding which checkpoints it keeps.

A policy maps the list of committed checkpoints (oldest first) to the set of steps it
wants to keep; a checkpoint survives if any policy keeps it. The newest checkpoint is
always kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Record:
    """What a policy may look at: the step and the metrics saved with it."""

    step: int
    metrics: Mapping[str, Any]


class Policy(Protocol):
    def keep(self, records: Sequence[Record]) -> set[int]: ...


@dataclass(frozen=True)
class LatestN:
    """Keep the ``n`` most recent checkpoints.

    >>> LatestN(2).keep([Record(1, {}), Record(2, {}), Record(3, {})])
    {2, 3}
    """

    n: int

    def keep(self, records: Sequence[Record]) -> set[int]:
        return {r.step for r in sorted(records, key=lambda r: r.step)[-self.n :]} if self.n > 0 else set()


@dataclass(frozen=True)
class EveryNSteps:
    """Keep, forever, every checkpoint whose step is a multiple of ``n``."""

    n: int

    def keep(self, records: Sequence[Record]) -> set[int]:
        return {r.step for r in records if self.n > 0 and r.step % self.n == 0}


@dataclass(frozen=True)
class BestN:
    """Keep the ``n`` checkpoints with the best value of ``metric`` (``mode`` "min" or "max").

    Checkpoints without the metric (or with NaN) are never "best". Ties go to the newer step.

    >>> BestN("val_loss", "min", 1).keep([Record(1, {"val_loss": 0.5}), Record(2, {"val_loss": 0.3})])
    {2}
    """

    metric: str
    mode: str = "min"
    n: int = 1

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"BestN mode must be 'min' or 'max', not {self.mode!r}")

    def best(self, records: Sequence[Record]) -> list[Record]:
        scored = [r for r in records if _number(r.metrics.get(self.metric)) is not None]
        sign = 1 if self.mode == "min" else -1
        return sorted(scored, key=lambda r: (sign * _number(r.metrics[self.metric]), -r.step))  # type: ignore[operator]

    def keep(self, records: Sequence[Record]) -> set[int]:
        return {r.step for r in self.best(records)[: self.n]}


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:  # an int too large for a float: not a usable metric
        return None
    return None if math.isnan(f) else f


def to_keep(records: Sequence[Record], policies: Iterable[Policy]) -> set[int]:
    """The union of what every policy keeps, plus the newest checkpoint."""
    keep: set[int] = set()
    for p in policies:
        keep |= p.keep(records)
    if records:
        keep.add(max(r.step for r in records))
    return keep
