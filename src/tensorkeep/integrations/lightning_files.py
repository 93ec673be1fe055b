"""The files of :class:`~tensorkeep.integrations.lightning.TensorkeepCheckpointIO`: how the plugin
tells its own ``.ckpt`` files (a header record: ``lightning.checkpoint_io``, the ``global_step`` and
the time of the save) and orders them without reading their tensors; ``latest`` and
``load_from_checkpoint`` for reading them back outside ``fit``.

>>> latest("checkpoints")  # doctest: +SKIP
'checkpoints/ck-step=10.ckpt'
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

try:
    from lightning.pytorch import LightningDataModule, LightningModule
except ImportError as _e:  # pragma: no cover - the extra is installed in dev
    raise ImportError(
        "tensorkeep.lightning needs Lightning: pip install 'tensorkeep[lightning]' (lightning==2.6.6)"
    ) from _e

from tensorkeep.errors import FormatError
from tensorkeep.file.reader import open_reader, read_file
from tensorkeep.storage import local as _io

MARK = "lightning.checkpoint_io"  # header metadata: written by this plugin (value: FORMAT)
FORMAT = "tensorkeep/1"
STEP, EPOCH, SAVED_NS, SKIPPED = "lightning.global_step", "lightning.epoch", "lightning.saved_ns", "lightning.skipped"
SUFFIX = ".ckpt"


@dataclass(frozen=True)
class _Ckpt:
    path: str
    step: int
    saved_ns: int


def _header(path: str) -> _Ckpt | None:
    """This plugin's record of a file (header only, no tensor read), or None for a file it did not
    write (a torch pickle, a plain safetensors file). A damaged header raises FormatError."""
    r = open_reader(path)
    try:
        meta = {} if r.torch_pickle else (r.metadata or {})
    finally:
        r.close()
    if meta.get(MARK) != FORMAT:
        return None
    try:
        return _Ckpt(path, int(meta[STEP]), int(meta[SAVED_NS]))
    except (KeyError, ValueError):
        raise FormatError(f"{path}: its {MARK} header has no valid {STEP} / {SAVED_NS}") from None


def _listing(directory: str) -> list[_Ckpt]:
    """The ``.ckpt`` files of ``directory`` this plugin wrote, newest save first (symlinks, such as
    ``save_last="link"`` makes, are aliases and not listed; unreadable headers are left out)."""
    found = []
    for name in os.listdir(directory):
        p = os.path.join(directory, name)
        if not name.endswith(SUFFIX) or not _io.is_regular_file(p):
            continue
        try:
            c = _header(p)
        except (FormatError, OSError):
            continue
        if c is not None:
            found.append(c)
    return sorted(found, key=lambda c: c.saved_ns, reverse=True)


def _device(map_location: Any) -> Any:
    """``map_location`` as ``tensorkeep.load``'s ``device``: a device name or ``torch.device`` is
    honoured; a dict or a function (torch.load's remapping forms) loads on the CPU."""
    return map_location if isinstance(map_location, (str, torch.device)) else None


def latest(directory: str | os.PathLike[str]) -> str | None:
    """The newest checkpoint in ``directory`` that this plugin wrote and that verifies (every
    checksum read), or None: for ``fit(ckpt_path=latest(dirpath))`` when Lightning finds no ``last.ckpt``.

    >>> trainer.fit(model, ckpt_path=latest("checkpoints"))  # doctest: +SKIP
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return None
    for c in _listing(directory):
        try:
            read_file(c.path)
            return c.path
        except (FormatError, OSError) as e:
            warnings.warn(f"skipping damaged checkpoint {c.path}: {e}; trying the previous one", stacklevel=2)
    return None


def load_from_checkpoint(
    cls: type[LightningModule] | type[LightningDataModule],
    path: str | os.PathLike[str],
    *,
    strict: bool | None = None,
    **kwargs: Any,
) -> Any:
    """``cls.load_from_checkpoint(path)`` for a file written by :class:`TensorkeepCheckpointIO`
    (Lightning's own reads with ``torch.load``, which cannot read it). ``kwargs`` override the saved
    hyper-parameters, as in Lightning.

    >>> model = load_from_checkpoint(MyModule, "checkpoints/last.ckpt")  # doctest: +SKIP
    """
    from lightning.pytorch.core.saving import _load_state
    from lightning.pytorch.utilities.migration.utils import _pl_migrate_checkpoint

    checkpoint = _pl_migrate_checkpoint(read_file(path), checkpoint_path=os.fspath(path))
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {}).update(kwargs)
    if issubclass(cls, LightningDataModule):
        return _load_state(cls, checkpoint, **kwargs)
    return _load_state(cls, checkpoint, strict=strict, **kwargs)
