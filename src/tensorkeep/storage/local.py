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
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tensorkeep import knobs
from tensorkeep.errors import FormatError, SaveError

TMP_MARK = ".tk-tmp-"
#: Suffix of the base name under which replace_dir parks a directory it is replacing (see there).
REPLACED = ".replaced"
#: Every temporary name tensorkeep makes: ``.<name>.tk-tmp-<pid>-<8 hex>`` (see :func:`tmp_path`).
#: Cleanup removes only names of this shape (and, elsewhere, names listed in its own manifests).
_TMP_RE = re.compile(r"^\.(?P<base>.+)\.tk-tmp-(?P<pid>\d{1,10})-[0-9a-f]{8}$", re.S)


def _save_error(e: OSError, path: str, what: str, replaced: bool = False) -> SaveError:
    name = errno.errorcode.get(e.errno or 0, str(e.errno))
    hint = {
        errno.ENOSPC: " The disk is full: free space or save elsewhere.",
        errno.EDQUOT: " The disk quota is exceeded.",
        errno.EACCES: " Check the directory's permissions.",
        errno.EROFS: " The file system is read-only.",
        errno.EFBIG: " The file is larger than this process or file system allows.",
    }.get(e.errno or 0, "")
    outcome = (
        "The new file is in place, but it may not survive a power cut; save again to be sure"
        if replaced
        else "The previous file, if any, is untouched"
    )
    return SaveError(e.errno, f"could not save {path}: {what} failed: {e.strerror or e} ({name}).{hint} {outcome}")


def tmp_path(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def temp_of(name: str) -> tuple[str, int] | None:
    """``(base name, pid)`` when ``name`` is a temporary name made by :func:`tmp_path`, else None.

    >>> temp_of(".model.tk.tk-tmp-4242-0a1b2c3d"), temp_of("model.tk"), temp_of(".x.tk-tmp-1-zz")
    (('model.tk', 4242), None, None)
    """
    m = _TMP_RE.match(name)
    return (m.group("base"), int(m.group("pid"))) if m else None


def is_stale_temp(name: str, directory: str | None = None) -> bool:
    """A temporary name of a tensorkeep process that no longer runs on this host. With
    ``directory``, a temporary *file* must also be unlocked: its writer holds a shared ``flock`` on
    it, which a live writer in another PID namespace (another container on the same volume) keeps."""
    t = temp_of(name)
    if t is None or t[1] == os.getpid() or pid_alive(t[1]):
        return False
    return directory is None or not _locked(os.path.join(directory, name))


def _locked(path: str) -> bool:
    """Whether another open file description holds an ``flock`` on this regular file."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True  # held (or flock unsupported: then keep it, being unsure)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale_temps(path: str, own: Callable[[str], set[str]] | None = None, manifest: str | None = None) -> None:
    """Remove what earlier saves of ``path`` left when their process died (killed mid-save): only
    tensorkeep's temporary names of ``path``, never a symlink, never a temp of a live writer.

    Temporary *files* are removed. Temporary *directories* only with ``own`` (the names in one that
    are tensorkeep's: :func:`remove_own_dir`); one that a replace parked aside (see :func:`replace_dir`)
    is put back when ``path`` is missing and it holds its ``manifest``."""
    d, base = os.path.split(os.path.abspath(path))
    try:
        names = sorted(os.listdir(d), key=lambda n: REPLACED not in n)  # parked ones first
    except OSError:
        return
    for n in names:
        t, p = temp_of(n), os.path.join(d, n)
        if t is None or t[0] not in (base, base + REPLACED) or not is_stale_temp(n, d):
            continue
        try:
            if is_regular_file(p) and t[0] == base:
                unlink(p)
            elif own is not None and is_real_dir(p):
                if (
                    t[0] != base
                    and not os.path.lexists(path)
                    and manifest
                    and is_regular_file(os.path.join(p, manifest))
                ):
                    rename(p, path)
                    fsync_dir(d)
                else:
                    remove_own_dir(p, own(p))
        except OSError:
            pass


def is_regular_file(path: str) -> bool:
    """A regular file, not followed through a symlink."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def is_real_dir(path: str) -> bool:
    """A directory, not followed through a symlink."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def open_regular(path: str) -> int:
    """A read-only descriptor of ``path``, which must be a regular file: a FIFO is refused
    (:class:`FormatError`) instead of blocking ``open`` until some writer comes, forever.

    >>> os.close(open_regular(__file__))
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # O_NONBLOCK: no wait on a FIFO
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError(
                f"{path}: not a regular file (a FIFO, a device or a directory); tensorkeep reads "
                "tensors only from regular files"
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


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


def link(src: str, dst: str) -> None:
    """A hard link ``dst`` to ``src`` itself (a symlink ``src`` is linked, not followed)."""
    os.link(src, dst, follow_symlinks=False)


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


def replace_dir(src: str, dst: str, durable: bool = True, names: set[str] | frozenset[str] = frozenset()) -> None:
    """Publish directory ``src`` as ``dst`` atomically, then fsync the parent (``durable=False``: not).

    An existing ``dst`` is swapped out, and of it only the entries in ``names`` (what the caller
    proved is its own, from the old directory's manifest) are deleted, after a durable swap; the
    caller checked that it holds nothing else. A symlink ``dst`` is refused, never followed."""
    parent = os.path.dirname(os.path.abspath(dst))
    if os.path.islink(dst):
        raise OSError(errno.EEXIST, f"{dst} is a symbolic link; tensorkeep does not replace it")
    if not os.path.lexists(dst):
        rename(src, dst)
    elif _exchange(src, dst):
        fsync_dir(parent)
        remove_own_dir(src, names)  # now holds the old directory
    else:  # no RENAME_EXCHANGE: a crash between these renames leaves dst missing, and the old directory
        old = tmp_path(dst + REPLACED)  # under a name that says so: the next open puts it back
        rename(dst, old)
        rename(src, dst)
        fsync_dir(parent)
        remove_own_dir(old, names)
    if durable:
        fsync_dir(parent)


def remove_own_dir(path: str, names: set[str] | frozenset[str]) -> list[str]:
    """Delete the entries ``names`` of directory ``path`` that are regular files (never a symlink or a
    directory), then the directory if that left it empty. Returns what is left in it."""
    for n in names:
        p = os.path.join(path, n)
        if is_regular_file(p):
            unlink(p)
    left = sorted(os.listdir(path))
    if not left:
        rmdir(path)
    return left


def rmdir(path: str) -> None:
    os.rmdir(path)


def unlink_if_exists(path: str) -> None:
    try:
        unlink(path)
    except FileNotFoundError:
        pass


def mkdir(path: str) -> None:
    os.mkdir(path)


def makedirs(path: str, durable: bool = True) -> None:
    """``os.makedirs(path, exist_ok=True)`` that also fsyncs the parent of every directory it creates
    (``durable=False``: not), so a commit acknowledged inside it cannot vanish with its directory."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        makedirs(parent, durable)
    try:
        mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    if durable:
        fsync_dir(parent)


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
    """Open (creating if needed) a lock file for reading and writing; not inherited by exec'd children,
    never through a symlink (ELOOP): the lock is written, and must not write a file elsewhere."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)


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
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise _save_error(e, path, "looking at the target") from e
        if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise SaveError(
                errno.EEXIST,
                f"could not save {path}: it exists and is not a regular file (a device, "
                "a FIFO, a socket or a directory), so tensorkeep does not replace it. Fix: save to a "
                "file path. The existing entry is untouched",
            )
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
        if temp_of(os.path.basename(tmp)):
            _hold(fd)
        step = "writing"
        yield fd
        if durable:
            step = "fsync of the file"
            fsync(fd)
        _HELD_FDS.discard(fd)
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
            _HELD_FDS.discard(fd)
            os.close(fd)
        if os.path.lexists(tmp):
            try:
                unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError) and not isinstance(e, SaveError):
            raise _save_error(e, path, step, replaced) from e
        raise


def _hold(fd: int) -> None:
    """A shared ``flock`` on a temp file while it is written: :func:`is_stale_temp` leaves it alone."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        _HELD_FDS.add(fd)
    except OSError:
        pass  # no flock here: the pid in the name is all there is


_HELD_FDS: set[int] = set()  # temp files this process writes under a shared flock (_hold)


def _drop_held_in_child() -> None:
    """A forked child must not prolong a temp file's flock: a dead writer's file would look live."""
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_drop_held_in_child)


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
