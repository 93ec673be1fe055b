"""Training checkpoints: a directory per step, committed last, restored exactly."""

from tensorkeep.checkpoint.listing import CheckpointInfo, list_checkpoints
from tensorkeep.checkpoint.manager import CheckpointManager
from tensorkeep.checkpoint.policies import BestN, EveryNSteps, LatestN, Record
from tensorkeep.checkpoint.rng import keep_rng
from tensorkeep.checkpoint.seeding import SampleRNG, sample_seed, seeded

__all__ = [
    "CheckpointManager",
    "list_checkpoints",
    "CheckpointInfo",
    "LatestN",
    "BestN",
    "EveryNSteps",
    "Record",
    "keep_rng",
    "SampleRNG",
    "seeded",
    "sample_seed",
]
