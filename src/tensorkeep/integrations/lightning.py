"""Lightning: every ``.ckpt`` is one crash-proof tensorkeep file, and ``fit(ckpt_path="last")``
resumes from the newest intact checkpoint.

>>> from tensorkeep.lightning import TensorkeepCheckpointIO  # doctest: +SKIP
>>> trainer = pl.Trainer(callbacks=[ck], plugins=[TensorkeepCheckpointIO()])  # doctest: +SKIP
>>> trainer.fit(model, ckpt_path="last")  # doctest: +SKIP

Each save goes through tensorkeep's writer (temporary file, CRC-32 per block, fsync, rename, fsync of
the directory), with no pickle: the checkpoint dict is stored as tensorkeep's typed tree. A file
records in its header ``lightning.checkpoint_io``, the ``global_step`` and the time of the save, so
the plugin can tell its own files and order them without reading their tensors.

Lightning resolves ``"last"`` to the ``last*.ckpt`` file with the newest mtime and asks the plugin to
load it. A crash between the two saves of one step (``ck-step=10.ckpt``, then ``last.ckpt``) leaves a
stale ``last.ckpt``: :meth:`TensorkeepCheckpointIO.load_checkpoint` then loads the newer checkpoint
of that directory instead (and skips a damaged one), with a warning naming both.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Literal

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.callbacks import ModelCheckpoint
except ImportError as _e:  # pragma: no cover - the extra is installed in dev
    raise ImportError(
        "tensorkeep.lightning needs Lightning: pip install 'tensorkeep[lightning]' (lightning==2.6.6)"
    ) from _e

from tensorkeep.checkpoint.background import Background
from tensorkeep.core.tree import flatten
from tensorkeep.distributed.comm import Comm
from tensorkeep.errors import CheckpointNotFoundError, FormatError
from tensorkeep.file.reader import read_file
from tensorkeep.file.writer import save
from tensorkeep.integrations.lightning_files import (
    EPOCH,
    FORMAT,
    MARK,
    SAVED_NS,
    SKIPPED,
    STEP,
    SUFFIX,
    _device,
    _header,
    _listing,
    latest,
    load_from_checkpoint,
)
from tensorkeep.storage import local as _io
from tensorkeep.storage import resolve

__all__ = ["TensorkeepCheckpointIO", "latest", "load_from_checkpoint"]

_HPARAM_KEYS = tuple(
    getattr(cls, a)
    for cls in (LightningModule, LightningDataModule)
    for a in ("CHECKPOINT_HYPER_PARAMS_KEY", "CHECKPOINT_HYPER_PARAMS_TYPE")
)
_STORES = (
    "tensorkeep stores tensors, NumPy arrays, dict/OrderedDict with str or int keys, list, tuple, "
    "str/int/float/bool/None and torch.dtype/device/Size, never a pickle (loading runs no code)"
)


def _key_path(path: tuple) -> str:
    return "checkpoint" + "".join(f"[{k!r}]" for k in path)


def _unsupported(x: Any, path: tuple = ()) -> list[tuple[tuple, str]]:
    """Every value under ``x`` the typed tree refuses, as (key path, what it is). The tree itself
    judges each leaf, so this never disagrees with the writer."""
    t = type(x)
    if len(path) > 64:
        return [(path, "nested more than 64 levels deep")]
    if t is dict or t is OrderedDict:
        out = []
        for k, v in x.items():
            if type(k) is str or type(k) is int:
                out += _unsupported(v, (*path, k))
            else:
                out.append(((*path, k), f"a dict key of type {type(k).__qualname__} (keys must be str or int)"))
        return out
    if t is list or t is tuple:
        return [bad for i, v in enumerate(x) for bad in _unsupported(v, (*path, i))]
    try:
        flatten(x)
    except (TypeError, ValueError):
        try:
            shown = repr(x)
        except Exception:
            shown = "?"
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return [(path, f"of type {t.__module__}.{t.__qualname__} ({shown})")]
    return []


def _refusal(path: str, bad: list[tuple[tuple, str]], hparams: bool) -> TypeError:
    lines = "\n".join(f"  {_key_path(p)} is {what}" for p, what in bad[:10])
    more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
    if hparams:
        names = sorted({str(p[1]) for p, _ in bad if len(p) > 1})
        ignore = f"leave them out with self.save_hyperparameters(ignore={names!r}); or " if names else ""
        fix = (
            f"Fix: {ignore}save plain values (a class's import path as a string, a dict instead of a config "
            "object, e.g. OmegaConf.to_container(cfg)) and build the objects in __init__; or let the plugin "
            'drop them: TensorkeepCheckpointIO(unsupported="skip") (then pass them to load_from_checkpoint yourself)'
        )
    else:
        fix = (
            "Fix: put plain values or tensors into the checkpoint (an object's state_dict(), not the object) "
            "in on_save_checkpoint, a callback's state_dict() or the datamodule's state_dict()"
        )
    return TypeError(f"cannot save Lightning checkpoint {path}: {_STORES}. Not storable:\n{lines}{more}\n{fix}")


class TensorkeepCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that writes every checkpoint as one tensorkeep file.

    ``unsupported``: what to do with a hyper-parameter the typed tree cannot store (a class, a
    ``Namespace``, a config object): ``"error"`` (default) refuses the save, naming each key path and
    the fix; ``"skip"`` leaves that hyper-parameter out of the file (recorded in the header as
    ``lightning.skipped``, warned once per key). Resuming does not read hyper-parameters;
    ``load_from_checkpoint`` then needs them passed. Anything else that cannot be stored is always refused.
    ``resolve_last``: a requested ``last*.ckpt`` resolves to the newest intact checkpoint of its
    directory (see :meth:`load_checkpoint`). ``durable=False`` skips the fsyncs (scratch runs).

    ``async_save=True``: ``save_checkpoint`` copies the checkpoint's tensors into staging buffers
    that are reused from one save to the next (memory already touched: the copy runs at memory
    speed) and returns; a background thread writes the file. One save is in flight at a time: the
    next save, ``load_checkpoint`` and ``teardown`` wait for it, and raise its error. Lightning's
    ``AsyncCheckpointIO`` works too, but clones every tensor into new memory on the training thread.
    (No ``"lazy"`` mode: Lightning runs the forward and backward pass inside ``optimizer.step``, so
    a step would wait for a deferred copy before them, and the copy would overlap nothing.)

    >>> trainer = pl.Trainer(plugins=[TensorkeepCheckpointIO()])  # doctest: +SKIP
    >>> trainer = pl.Trainer(plugins=[TensorkeepCheckpointIO(async_save=True)])  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        unsupported: Literal["error", "skip"] = "error",
        resolve_last: bool = True,
        durable: bool = True,
        async_save: bool = False,
    ) -> None:
        if unsupported not in ("error", "skip"):
            raise ValueError(f'unsupported must be "error" or "skip", got {unsupported!r}')
        super().__init__()
        self.unsupported, self.resolve_last, self.durable = unsupported, resolve_last, durable
        self.async_save = async_save
        self._lock = threading.Lock()
        self._writer: int | None = None  # thread of the latest save (another thread: AsyncCheckpointIO)
        self._bg: Background | None = None  # async_save: the writer thread, its staging buffers, its save
        self._pid = os.getpid()
        self._last: tuple[str, bool] | None = None  # the latest save: (path, committed)
        self._pending: set[str] = set()  # removals waiting for a later save (see _settle)
        self._warned: set[str] = set()
        atexit.register(_flush_at_exit, weakref.ref(self))

    # ------------------------------------------------------------------ save

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically and durably (Lightning calls it on rank 0).

        >>> TensorkeepCheckpointIO().save_checkpoint({"state_dict": {}}, "ck/x.ckpt")  # doctest: +SKIP
        """
        if storage_options is not None:
            raise TypeError(
                f"TensorkeepCheckpointIO.save_checkpoint does not take storage_options (got {storage_options!r}); "
                "tensorkeep writes local paths and fsspec URLs itself"
            )
        path = os.fspath(path)
        state, skipped = self._storable(checkpoint, path)
        if not self.async_save:
            return self._save_now(state, skipped, path)
        bad = _unsupported(state)  # refused now, on the caller's thread, not later by the writer
        if bad:
            raise _refusal(path, bad, hparams=False)
        self.wait()  # the staging buffers are reused: the previous write must be done (its error raises here)
        if self._bg is None or self._bg.forked:  # (a forked child: the inherited writer thread is the parent's)
            self._bg = Background(True, f"TensorkeepCheckpointIO ({os.path.dirname(path) or '.'})")
        with self._lock:
            self._writer = _BACKGROUND  # from now on a removal waits for a later save (see _settle)
        self._bg.call(
            _as_int(state.get("global_step")),
            state,
            lambda snapshot: self._save_now(snapshot, skipped, path),
            lambda: self._saved(path, False),
        )

    def wait(self) -> None:
        """With ``async_save``: block until the save in flight is durable; raise its error, if it failed.

        >>> plugin.wait()  # doctest: +SKIP
        """
        if self._bg is not None and not self._bg.forked:
            self._bg.wait()

    def _save_now(self, state: dict[str, Any], skipped: list[str], path: str) -> None:
        with self._lock:
            self._writer = threading.get_ident()
        ok = False
        try:
            self._write(state, skipped, path)
            ok = True
        finally:
            self._saved(path, ok)

    def _saved(self, path: str, ok: bool) -> None:
        with self._lock:
            self._last = (path, ok)
        self._settle(path, ok)

    def _write(self, state: dict[str, Any], skipped: list[str], path: str) -> None:
        meta = {
            MARK: FORMAT,
            STEP: str(_as_int(state.get("global_step"))),
            EPOCH: str(_as_int(state.get("epoch"))),
            SAVED_NS: str(time.time_ns()),
        }
        if skipped:
            meta[SKIPPED] = json.dumps(skipped)
        backend, key = resolve(path)
        if backend.local:
            _io.makedirs(os.path.dirname(backend.path(key)), self.durable)
        try:
            save(state, path, metadata=meta, durable=self.durable)
        except (TypeError, ValueError) as e:
            if not str(e).startswith("cannot save"):
                raise
            raise _refusal(path, _unsupported(state) or [((), str(e))], hparams=False) from None

    def _storable(self, checkpoint: dict[str, Any], path: str) -> tuple[dict[str, Any], list[str]]:
        """The checkpoint to write, and the key paths left out under ``unsupported="skip"``."""
        bad = [b for k in _HPARAM_KEYS if k in checkpoint for b in _unsupported(checkpoint[k], (k,))]
        if not bad:
            return checkpoint, []
        if self.unsupported == "error":
            raise _refusal(path, bad, hparams=True)
        state = dict(checkpoint)
        dropped = []
        for p, what in bad:
            top, name = p[0], p[1] if len(p) > 1 else None
            if name is None or type(state.get(top)) not in (dict, OrderedDict):
                state.pop(top, None)
                where = _key_path((top,))
            else:
                state[top] = type(state[top])((k, v) for k, v in state[top].items() if k != name)
                where = _key_path((top, name))
            if where not in dropped:
                dropped.append(where)
                if where not in self._warned:
                    self._warned.add(where)
                    warnings.warn(
                        f'TensorkeepCheckpointIO(unsupported="skip"): {where} is {what}, so it is left out of '
                        f"{path} (and every later checkpoint). Resuming does not need it; load_from_checkpoint "
                        "needs it passed as an argument",
                        stacklevel=3,
                    )
        return state, dropped

    # ------------------------------------------------------------------ load

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        """Read a checkpoint, verifying every checksum (a damaged file raises ``ChecksumError``).

        A requested ``last*.ckpt`` (how Lightning resolves ``ckpt_path="last"``) loads the newest
        intact checkpoint of its directory written by this plugin: a checkpoint saved after it with a
        higher ``global_step`` (the crash came between the two saves of a step), or, when it is
        damaged, the newest one that verifies. ``map_location``: a device or device name; a dict or
        a function loads on the CPU. ``weights_only`` changes nothing: nothing is ever unpickled (a
        stock ``.ckpt`` is read through tensorkeep's weights-only ``.pt`` reader).

        >>> ckpt = TensorkeepCheckpointIO().load_checkpoint("ck/last.ckpt")  # doctest: +SKIP
        """
        self.wait()
        if self.async_save and Comm().world > 1:  # every rank loads: none reads before rank 0's write is done
            Comm().all_gather(None)
        path, device = os.fspath(path), _device(map_location)
        name = os.path.basename(path)
        last = name.endswith(SUFFIX) and name[: -len(SUFFIX)].startswith(ModelCheckpoint.CHECKPOINT_NAME_LAST)
        if not (self.resolve_last and last and resolve(path)[0].local):
            return read_file(path, device=device)
        comm = Comm()
        if comm.world == 1:
            return self._load_newest(path, device)[1]
        chosen, loaded, error = None, None, None  # rank 0 chooses; every rank loads the same file
        if comm.rank == 0:
            try:
                chosen, loaded = self._load_newest(path, device)
            except Exception as e:
                error = e
        got = comm.all_gather({"path": chosen, "error": None if error is None else f"{type(error).__name__}: {error}"})
        if error is not None:
            raise error
        if got[0]["error"]:
            raise CheckpointNotFoundError(f"cannot resume from {path}: rank 0 could not load it: {got[0]['error']}")
        return loaded if comm.rank == 0 else read_file(got[0]["path"], device=device)

    def _load_newest(self, path: str, device: Any) -> tuple[str, Any]:
        """(the path loaded, its checkpoint) for a requested ``last*.ckpt``; see :meth:`load_checkpoint`."""
        damaged = False
        try:
            asked = _header(path)
        except FileNotFoundError:
            asked = None
        except (FormatError, OSError) as e:
            warnings.warn(f"skipping damaged checkpoint {path}: {e}; trying the others of its directory", stacklevel=3)
            asked, damaged = None, True
        if asked is None and not damaged:  # not written by this plugin: load what was asked, as Lightning would
            return path, read_file(path, device=device)
        real = os.path.realpath(path)
        others = [c for c in _listing(os.path.dirname(os.path.abspath(path))) if os.path.realpath(c.path) != real]
        if asked is None:
            newer, order = [], others
        else:
            newer = [c for c in others if c.saved_ns > asked.saved_ns and c.step > asked.step]
            order = [*newer, asked, *(c for c in others if c not in newer)]
        first_error: Exception | None = None
        for c in order:
            try:
                loaded = read_file(c.path, device=device)
            except (FormatError, OSError) as e:
                first_error = first_error or e
                warnings.warn(f"skipping damaged checkpoint {c.path}: {e}; trying the previous one", stacklevel=3)
                continue
            if c.path != path:
                why = (
                    f"it was saved after {path} (step {asked.step}) and is further along: the run stopped "
                    f"between saving it and saving {os.path.basename(path)}"
                    if asked is not None and c in newer
                    else f"{path} is damaged"
                )
                warnings.warn(f"resuming from {c.path} (step {c.step}): {why}", stacklevel=3)
            return c.path, loaded
        raise CheckpointNotFoundError(
            f"cannot resume from {path}: it and every other checkpoint of its directory written by "
            f"TensorkeepCheckpointIO are damaged or missing (first error: {first_error}). Fix: run "
            f"`tensorkeep verify {os.path.dirname(os.path.abspath(path))}`, or start without ckpt_path"
        )

    # ------------------------------------------------------------------ remove

    def remove_checkpoint(self, path: Any) -> None:
        """Delete a checkpoint this plugin wrote (``save_top_k`` rotation); anything else is kept,
        with a warning. Under ``AsyncCheckpointIO`` (saves on another thread) the deletion waits until
        a newer save has committed (see :meth:`_settle`): the old checkpoint never goes before a newer
        one is there.

        >>> TensorkeepCheckpointIO().remove_checkpoint("ck/old.ckpt")  # doctest: +SKIP
        """
        path = os.fspath(path)
        with self._lock:
            # saves on another thread (AsyncCheckpointIO), or none yet and this one missing (its save is queued)
            if self._writer not in (None, threading.get_ident()) or (self._writer is None and not _exists(path)):
                self._pending.add(path)
                return
        self._remove(path)

    def _remove(self, path: str) -> None:
        backend, key = resolve(path)
        local = backend.path(key) if backend.local else None
        if local is not None and not os.path.lexists(local):
            return
        if local is not None and os.path.islink(local):  # save_last="link": the link holds no data
            _io.unlink(local)
            return
        try:
            ours = _header(path) is not None
        except FileNotFoundError:
            return
        except (FormatError, OSError):
            ours = False
        if not ours:
            warnings.warn(
                f"TensorkeepCheckpointIO keeps {path}: Lightning asked to remove it, but it is not a checkpoint "
                "this plugin wrote (or its header is damaged), and tensorkeep never deletes what it did not write",
                stacklevel=3,
            )
            return
        if local is None:
            backend.delete([key])
            return
        _io.unlink(local)
        if self.durable:
            _io.fsync_dir(os.path.dirname(local))

    def _settle(self, path: str, ok: bool) -> None:
        """After a save of ``path``: the removals waiting for it.

        Under ``AsyncCheckpointIO`` saves queue up on one thread, and Lightning asks to remove the old
        checkpoint right after queueing the new one, maybe before the old one's own save has run. A
        removal of P is therefore carried out at the end of the first save of another path that ends
        once P exists: that save was queued after P's, so it is newer. If it failed, P is kept."""
        with self._lock:
            due = [p for p in self._pending if p != path and _exists(p)]
            self._pending.difference_update(due)
        for p in due:
            if ok:
                try:
                    self._remove(p)
                except OSError as e:  # the save committed: a removal that failed must not fail it
                    warnings.warn(f"TensorkeepCheckpointIO could not remove {p}: {e}", stacklevel=2)
            else:
                warnings.warn(f"TensorkeepCheckpointIO keeps {p}: the save after its removal failed", stacklevel=2)

    def teardown(self) -> None:
        """End of ``fit``, and interpreter exit (``AsyncCheckpointIO`` does not call its plugin's
        ``teardown``): the removals still waiting. No save ended after them, so they followed the
        latest save: they are carried out if that save committed a newer checkpoint, else kept.
        With ``async_save``, the save in flight is waited for first; its error is raised at the end."""
        error: BaseException | None = None
        try:
            self.wait()
        except BaseException as e:  # the removals below still run: they keep what the failed save would replace
            error = e
        bg, self._bg = self._bg, None
        if bg is not None and not bg.forked:
            bg.close()  # its thread ends here; a later save starts another
        with self._lock:
            due, last = [p for p in self._pending if _exists(p)], self._last
            self._pending.clear()
        for p in due:
            try:
                if last is not None and last[1] and last[0] != p:
                    self._remove(p)
                else:
                    warnings.warn(f"TensorkeepCheckpointIO keeps {p}: no newer checkpoint was saved", stacklevel=2)
            except OSError as e:
                warnings.warn(f"TensorkeepCheckpointIO could not remove {p}: {e}", stacklevel=2)
        if error is not None:
            raise error


def _flush_at_exit(ref: weakref.ref[TensorkeepCheckpointIO]) -> None:
    plugin = ref()
    if plugin is not None and plugin._pid == os.getpid():  # a forked child: the save in flight is the parent's
        try:
            plugin.teardown()
        except Exception as e:  # at exit no caller is left to raise to
            warnings.warn(f"TensorkeepCheckpointIO: the last asynchronous save failed: {e}", stacklevel=1)


_BACKGROUND = -1  # TensorkeepCheckpointIO._writer: saves run on the async_save writer thread


def _exists(path: str) -> bool:
    backend, key = resolve(path)
    return os.path.lexists(backend.path(key)) if backend.local else backend.exists(key)


def _as_int(x: Any) -> int:
    try:
        return int(x)
    except (TypeError, ValueError):
        return -1
