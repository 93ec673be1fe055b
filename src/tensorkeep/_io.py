"""Every file-system mutation tensorkeep makes goes through this module.

Keeping them in one place makes the durability protocol auditable (and lets the
crash-consistency tests record and replay them): write a temporary file in the
target directory, fsync it, rename it over the target, fsync the directory.
A failed fsync is fatal for that save and never retried: after a failed fsync
Linux may already have dropped the dirty pages, so a retry could "succeed" on lost data.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import secrets
import shutil
import threading
from contextlib import contextmanager
from typing import Iterator

from . import knobs
from .errors import SaveError

TMP_MARK = ".tk-tmp-"


def _save_error(e: OSError, path: str, what: str, replaced: bool = False) -> SaveError:
    name = errno.errorcode.get(e.errno or 0, str(e.errno))
    hint = {
        errno.ENOSPC: " The disk is full: free space or save elsewhere.",
        errno.EDQUOT: " The disk quota is exceeded.",
        errno.EACCES: " Check the directory's permissions.",
        errno.EROFS: " The file system is read-only.",
        errno.EFBIG: " The file is larger than this process or file system allows.",
    }.get(e.errno or 0, "")
    outcome = ("The new file is in place, but it may not survive a power cut; save again to be sure" if replaced
               else "The previous file, if any, is untouched")
    return SaveError(e.errno, f"could not save {path}: {what} failed: {e.strerror or e} ({name}).{hint} {outcome}")


def tmp_path(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale_temps(path: str) -> None:
    """Remove temp files of earlier saves of ``path`` whose process died (killed mid-save).

    Only files named after ``path`` and owned by a pid that no longer exists on this host are
    touched, so a concurrent save by a live process is never disturbed.
    """
    d, base = os.path.split(os.path.abspath(path))
    prefix = f".{base}{TMP_MARK}"
    try:
        names = [n for n in os.listdir(d) if n.startswith(prefix)]
    except OSError:
        return
    for n in names:
        pid = n[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            try:
                unlink(os.path.join(d, n))
            except OSError:
                pass


def fsync(fd: int) -> None:
    os.fsync(fd)


def fsync_dir(path: str) -> None:
    """fsync a directory so a rename or new entry in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(src: str, dst: str) -> None:
    os.replace(src, dst)


def rename(src: str, dst: str) -> None:
    os.rename(src, dst)


def unlink(path: str) -> None:
    os.unlink(path)


def rmtree(path: str) -> None:
    shutil.rmtree(path)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), b)


def replace_dir(src: str, dst: str, durable: bool = True) -> None:
    """Publish directory ``src`` as ``dst`` atomically (swapping out an existing ``dst``), then fsync
    the parent (``durable=False``: not; an old ``dst`` is still deleted only after a durable swap)."""
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.lexists(dst):
        rename(src, dst)
    elif _exchange(src, dst):
        fsync_dir(parent)
        rmtree(src)  # now holds the old directory
    else:  # no RENAME_EXCHANGE: a crash between these renames leaves dst missing but both copies on disk
        old = tmp_path(dst)
        rename(dst, old)
        rename(src, dst)
        fsync_dir(parent)
        rmtree(old)
    if durable:
        fsync_dir(parent)


def unlink_if_exists(path: str) -> None:
    try:
        unlink(path)
    except FileNotFoundError:
        pass


def mkdir(path: str) -> None:
    os.mkdir(path)


def makedirs(path: str) -> None:
    os.makedirs(path, exist_ok=True)


def open_new(path: str, direct: bool = False) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    if direct:
        flags |= os.O_DIRECT
    return os.open(path, flags, 0o644)


def pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    """Write all of ``buf`` at ``offset``, continuing after short writes.

    On an ``O_DIRECT`` descriptor a short write that ends mid-block leaves the rest at an unaligned
    offset and address, which the kernel refuses (EINVAL): the descriptor then drops ``O_DIRECT``
    and the file is finished through the page cache (the fsync that follows covers both)."""
    while len(buf):
        n = os.pwrite(fd, buf, offset)
        if n <= 0:
            raise OSError(errno.EIO, "write returned 0 bytes")
        buf = buf[n:]
        offset += n
        if len(buf) and offset % knobs.ALIGN and fd_is_direct(fd):
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


def ftruncate(fd: int, size: int) -> None:
    os.ftruncate(fd, size)


def open_lock_file(path: str) -> int:
    """Open (creating if needed) a lock file for reading and writing; not inherited by exec'd children."""
    return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)


@contextmanager
def atomic_file(path: str, *, durable: bool = True, direct: bool = False, in_place: bool = False) -> Iterator[int]:
    """Yield a file descriptor for a temp file that replaces ``path`` on success.

    With ``direct=True`` the descriptor is opened with ``O_DIRECT`` where the file
    system allows it (callers must then write aligned buffers); check ``fd_is_direct``.
    On any exception the temp file is removed and ``path`` is left as it was.
    ``in_place=True`` writes ``path`` itself (which must not exist) with no rename and no
    directory fsync: for files inside a directory that is itself published by a rename later.
    """
    if not in_place:
        remove_stale_temps(path)
    tmp = path if in_place else tmp_path(path)
    step = "creating a temporary file"
    fd, replaced = -1, False
    try:
        try:
            fd = open_new(tmp, direct)
        except OSError as e:
            if not direct or e.errno != errno.EINVAL:
                raise
            fd = open_new(tmp, False)  # this file system refuses O_DIRECT: buffered fallback
        step = "writing"
        yield fd
        if durable:
            step = "fsync of the file"
            fsync(fd)
        os.close(fd)
        fd = -1
        if in_place:
            return
        step = "renaming the temporary file over the target"
        replace(tmp, path)
        replaced = True
        if durable:
            step = "fsync of the directory"
            fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException as e:
        if fd >= 0:
            os.close(fd)
        if os.path.lexists(tmp):
            try:
                unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError) and not isinstance(e, SaveError):
            raise _save_error(e, path, step, replaced) from e
        raise


def fd_is_direct(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))


class StagingPool:
    """Page-aligned staging buffers, reused across saves: touching fresh memory is ~50x
    slower than copying into memory that is already mapped."""

    def __init__(self) -> None:
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def get(self, size: int) -> mmap.mmap:
        with self._lock:
            for i, b in enumerate(self._free):
                if len(b) == size:
                    return self._free.pop(i)
        return mmap.mmap(-1, size)

    def put(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < 4:
                self._free.append(buf)
                return
        try:
            buf.close()
        except BufferError:  # a view is still alive (say, in a failed write's traceback): leave it to the GC
            pass


STAGING = StagingPool()
