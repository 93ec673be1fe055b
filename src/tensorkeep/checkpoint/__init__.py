"""Training checkpoints: a directory per step, committed last, restored exactly."""

from .manager import CheckpointManager
from .policies import BestN, EveryNSteps, LatestN, Record
from .rng import keep_rng

__all__ = ["CheckpointManager", "LatestN", "BestN", "EveryNSteps", "Record", "keep_rng"]
