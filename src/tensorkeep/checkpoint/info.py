"""What a listing of a run says about one checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CheckpointInfo:
    """One entry of :func:`list_checkpoints`. ``status`` is "ok", "damaged: ..." or "uncommitted".

    ``bytes_held``: what restoring it reads; ``bytes_written``: what saving it wrote (less for an
    incremental checkpoint that reuses tensors of earlier ones)."""

    step: int
    path: str
    status: str
    time: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    bytes_held: int = 0
    bytes_written: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"
