"""Reading a ``torch.save`` file: its pickle scanned, its CRC-32s checked, never any code run.

:class:`CheckedFile` is what ``torch.load`` reads: each zip entry torch reads whole is checked in
the buffer torch just filled, so the file is read once; :meth:`CheckedFile.check_rest` checks
what torch did not read that way. :func:`load_torch_file` is ``torch.load(weights_only=True)``
with those checks, and with what torch returns walked once, bounded.

>>> import torch
>>> torch.save({"w": torch.ones(2)}, "/tmp/tk-doc-ptzip.pt")
>>> with CheckedFile("/tmp/tk-doc-ptzip.pt") as f:
...     w = torch.load(f, weights_only=True)["w"]
...     f.check_rest()
>>> w
tensor([1., 1.])
"""

from __future__ import annotations

import io
import mmap
import os
import re
from typing import Any

import torch

from tensorkeep.core.format import crc32
from tensorkeep.core.ptzip import (
    ZIP_MAGIC,
    _mismatch,
    check_buffer,
    check_entries,
    check_legacy_pickles,
    check_zip_pickle,
    read_directory,
)
from tensorkeep.core.tree import check_nesting
from tensorkeep.errors import ChecksumError, FormatError, TensorkeepError
from tensorkeep.file.audit import audited
from tensorkeep.storage import local as _io


class UnsafePickleError(FormatError):
    """A ``.pt`` file needs code (a class, a function) to load; tensorkeep never runs it."""


def is_zip(path: str) -> bool:
    """True for a ``torch.save`` zip archive (it has CRC-32s), False for a legacy torch pickle."""
    fd = _io.open_regular(path)
    try:
        return os.pread(fd, 4, 0) == ZIP_MAGIC
    finally:
        os.close(fd)


class CheckedFile(io.RawIOBase):
    """``path`` opened for ``torch.load``: each zip entry torch reads whole is checked on arrival.

    ``legacy`` is True for a non-zip torch file (nothing to check). After ``torch.load`` returns,
    call :meth:`check_rest`; ``check_all_mapped`` checks everything up front instead (for
    ``mmap=True`` loads, which read the file themselves). ``deflated_ok``: compressed entries are
    accepted, for ``verify=False`` loads (torch reads the path itself; only the pickle is checked).
    """

    def __init__(self, path: str, *, deflated_ok: bool = False) -> None:
        super().__init__()
        self.path, self.pos, self.fd = path, 0, -1
        self.fd = _io.open_regular(path)
        try:
            self.size = os.fstat(self.fd).st_size
            self.legacy = os.pread(self.fd, 4, 0) != ZIP_MAGIC
            self.entries = [] if self.legacy else read_directory(path, self._pread, self.size, deflated_ok=deflated_ok)
        except BaseException:
            self.close()
            raise
        self._by_data = {e.data: e for e in self.entries}
        self._done: set[int] = set()  # data offsets of the entries already checked
        self.bad: ChecksumError | None = None  # the first mismatch readinto saw

    def _pread(self, n: int, at: int) -> bytes:
        return os.pread(self.fd, n, at)

    # -- the file object torch reads (seek + readinto)
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos + (0, self.pos, self.size)[whence]
        return self.pos

    def readinto(self, b: Any) -> int:
        with memoryview(b) as mv, mv.cast("B") as out:
            n = os.preadv(self.fd, [out], self.pos) if self.pos < self.size else 0
            e = self._by_data.get(self.pos)
            if e is not None and n == e.size and e.data not in self._done:
                found = crc32(out[:n])  # still in the CPU cache, or at least in memory: no second read
                if found != e.crc and self.bad is None:
                    self.bad = _mismatch(self.path, e, found)  # raised by check_rest: torch mangles errors
                self._done.add(e.data)
        self.pos += n
        return n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        super().close()

    # -- checks
    def check_pickle(self) -> None:
        """Scan the pickle(s) torch will run (:func:`check_pickle`), before it runs them."""
        if not self.legacy:
            check_zip_pickle(self.path, self.entries, self._pread)
        elif self.size:
            mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
            try:
                check_legacy_pickles(self.path, mm)
            finally:
                mm.close()

    def check_rest(self) -> None:
        """Raise what :meth:`readinto` found; check the entries torch did not read whole through it."""
        if self.bad is not None:
            raise self.bad
        check_entries(self.path, [e for e in self.entries if e.data not in self._done], self._pread)

    def check_all_mapped(self) -> None:
        """Check every entry through a read-only mapping (the pages a ``mmap=True`` load then maps)."""
        if self.entries and self.size:
            mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
            try:
                with memoryview(mm) as mv:
                    check_entries(self.path, self.entries, lambda n, at: mv[at : at + n])
            finally:
                try:
                    mm.close()
                except BufferError:  # a view still held by an error's traceback: unmapped when it goes
                    pass
        self._done.update(e.data for e in self.entries)


_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


@audited
def load_torch_file(path: str, device: Any, lazy: bool, source: Any = None, *, verify: bool = True) -> Any:
    """``torch.load(weights_only=True)`` of ``path`` (or of ``source``, a BytesIO holding its bytes).

    Before torch runs the pickle, it is scanned (``ptzip.check_pickle``: nothing a file can make
    torch's unpickler hash for ever or crash on); what torch returns is then walked once, bounded
    (``tree.check_nesting``: depth, and values counting shared containers at each use).
    ``verify`` checks the CRC-32 the zip archive stores for each entry (torch does not):
    eagerly, each entry as torch reads it; for ``lazy`` (``mmap=True``), all of them up front
    through a read-only mapping whose pages torch's mapping then shares. A legacy (non-zip)
    torch file has no checksums, and cannot be mapped: it is read eagerly, unchecked.
    """
    loc = device or "cpu"
    f: CheckedFile | None = None
    try:
        if source is not None:
            check_buffer(path, source.getbuffer(), crcs=verify)
            obj = torch.load(source, map_location=loc, weights_only=True)
        else:
            f = CheckedFile(path, deflated_ok=not verify)
            f.check_pickle()
            if not verify:
                obj = torch.load(path, map_location=loc, weights_only=True, mmap=lazy or None)
            elif f.legacy:
                obj = torch.load(path, map_location=loc, weights_only=True)
            elif lazy:
                f.check_all_mapped()
                obj = torch.load(path, map_location=loc, weights_only=True, mmap=True)
            else:
                # a file object cannot be mapped; torch.load reads any binary file object, its stubs say IO[bytes]
                obj = torch.load(f, map_location=loc, weights_only=True, mmap=False)  # type: ignore[arg-type]
                f.check_rest()
        check_nesting(obj, path)
        return obj
    except TensorkeepError:
        raise
    except Exception as e:
        if f is not None and not f.legacy and verify:
            f.check_rest()  # damage explains a failure better than torch's message does
        msg = str(e)
        m = _GLOBAL_RE.search(msg)
        if m or "Weights only load failed" in msg:
            what = m.group(1) if m else "a Python object"
            raise UnsafePickleError(
                f"{path}: this pickle needs {what} to load, so it holds Python objects (for example a whole "
                "model saved with torch.save(net)), not only tensors. Loading it would run code from the file, "
                "so tensorkeep refuses. Fix: save only the parameters, torch.save(net.state_dict(), path) or "
                "tk.save(net.state_dict(), path), and rebuild the model in code before tk.load_into(net, path); "
                "or use tk.save_model(net, path, config=...) to keep the architecture safely. If you trust this "
                "file's source, convert it once yourself: net = torch.load(path, weights_only=False); "
                "tk.save(net.state_dict(), 'model.safetensors')."
            ) from None
        raise FormatError(f"{path}: not a readable torch file ({type(e).__name__}: {msg[:300]})") from None
    finally:
        if f is not None:
            f.close()
