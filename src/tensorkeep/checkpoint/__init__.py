"""Training checkpoints: a directory per step, committed last, restored exactly."""

from .listing import CheckpointInfo, list_checkpoints
from .manager import CheckpointManager
from .policies import BestN, EveryNSteps, LatestN, Record
from .rng import keep_rng
from .seeding import SampleRNG, sample_seed, seeded

__all__ = ["CheckpointManager", "list_checkpoints", "CheckpointInfo", "LatestN", "BestN", "EveryNSteps", "Record", "keep_rng",
           "SampleRNG", "seeded", "sample_seed"]
