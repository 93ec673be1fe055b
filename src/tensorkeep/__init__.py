"""tensorkeep: safe, crash-proof, exact and fast files for tensors, models and training runs.

>>> import torch, tensorkeep as tk
>>> tk.save({"x": torch.arange(4)}, "/tmp/tk-doc-init.tk")
>>> tk.load("/tmp/tk-doc-init.tk")["x"]
tensor([0, 1, 2, 3])
"""

from .errors import (
    CheckpointNotFoundError, ChecksumError, FormatError, LockedError, MismatchError, SaveError,
    TensorkeepError, UntrustedModelError,
)
from .files import SafeOpen, UnsafePickleError, load, open, save

__version__ = "0.1.0"

__all__ = [
    "save", "load", "open", "SafeOpen",
    "TensorkeepError", "FormatError", "ChecksumError", "MismatchError", "UntrustedModelError",
    "CheckpointNotFoundError", "LockedError", "SaveError", "UnsafePickleError",
]
