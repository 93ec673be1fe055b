"""One error tree for tensorkeep.

Every error derives from :class:`TensorkeepError`; most also derive from the
builtin a caller would expect (``FormatError`` is a ``ValueError``), so
``except ValueError`` keeps working in code that predates tensorkeep.
"""

from __future__ import annotations


class TensorkeepError(Exception):
    """Base class of every error raised by tensorkeep."""


class FormatError(TensorkeepError, ValueError):
    """A file is not a valid tensorkeep / safetensors file (or cannot be read as one)."""


class ChecksumError(FormatError):
    """A tensorkeep file is damaged: a checksum does not match, or it is truncated."""


class LimitError(FormatError):
    """A file holds more than a reader limit allows (``tensorkeep.knobs.MAX_TENSORS``,
    ``MAX_JSON_VALUES``): not damaged, refused to bound memory; raise the knob to read it."""


class MismatchError(TensorkeepError, RuntimeError):
    """A checkpoint does not fit the model it is loaded into (names or shapes differ).

    A ``RuntimeError`` like the one ``Module.load_state_dict`` raises.
    """


class UntrustedModelError(TensorkeepError, PermissionError):
    """``load_model`` refused to import a class from a module outside ``allow``."""


class CheckpointNotFoundError(TensorkeepError, FileNotFoundError):
    """The requested checkpoint (or step) does not exist or is damaged."""


class LockedError(TensorkeepError, RuntimeError):
    """Another live process holds the lock of a run directory."""


class SaveError(TensorkeepError, OSError):
    """Writing failed (disk full, permission, I/O error); the previous file is untouched."""


class StorageError(TensorkeepError, OSError):
    """Object storage could not be reached or refused a request (network, credentials, server)."""
