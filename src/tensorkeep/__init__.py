"""tensorkeep: safe, crash-proof, exact and fast files for tensors, models and training runs.

>>> import torch, tensorkeep as tk
>>> tk.save({"x": torch.arange(4)}, "/tmp/tk-doc-init.tk")
>>> tk.load("/tmp/tk-doc-init.tk")["x"]
tensor([0, 1, 2, 3])
"""

from tensorkeep._version import __version__ as __version__
from tensorkeep.api import SafeOpen, load, open, save
from tensorkeep.architecture import load_model, save_model
from tensorkeep.checkpoint import (
    BestN,
    CheckpointInfo,
    CheckpointManager,
    EveryNSteps,
    LatestN,
    SampleRNG,
    keep_rng,
    list_checkpoints,
    seeded,
)
from tensorkeep.distributed.load import load_distributed
from tensorkeep.distributed.save import save_distributed
from tensorkeep.errors import (
    CheckpointNotFoundError,
    ChecksumError,
    FormatError,
    LimitError,
    LockedError,
    MismatchError,
    SaveError,
    StorageError,
    TensorkeepError,
    UntrustedModelError,
)
from tensorkeep.file.torchfile import UnsafePickleError
from tensorkeep.layouts.dcp import convert_dcp
from tensorkeep.layouts.sharded import save_sharded
from tensorkeep.model import LoadReport, load_into

__all__ = [
    "save",
    "load",
    "open",
    "SafeOpen",
    "load_into",
    "LoadReport",
    "save_model",
    "load_model",
    "save_sharded",
    "save_distributed",
    "load_distributed",
    "convert_dcp",
    "CheckpointManager",
    "list_checkpoints",
    "CheckpointInfo",
    "LatestN",
    "BestN",
    "EveryNSteps",
    "keep_rng",
    "SampleRNG",
    "seeded",
    "TensorkeepError",
    "FormatError",
    "ChecksumError",
    "LimitError",
    "MismatchError",
    "UntrustedModelError",
    "CheckpointNotFoundError",
    "LockedError",
    "SaveError",
    "StorageError",
    "UnsafePickleError",
]
