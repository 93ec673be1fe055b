"""One writer per run directory: a lock file holding the owner's pid and host.

The lock is an ``flock`` on ``run/.tensorkeep.lock``: the kernel releases it when its
owner dies, even by SIGKILL, so a stale lock is simply one nobody holds and is taken over.
That also survives pid reuse (a restarted container often gets the same pid as the job it
replaces). The file's content (pid, host) is only for the error message. On a file system
without ``flock`` the pid in the file decides: a lock whose pid is gone from this host is stale.

Only the process that took the lock holds it. A forked child (a DataLoader worker,
``multiprocessing`` with fork, ``os.fork``) inherits the descriptor, and with it a reference to
the locked open file description: the lock would outlive its owner by as long as the child
lives, and a restart right after a crash would be refused. So every child closes its copies
at once (:func:`_drop_in_child`); the parent's descriptor keeps the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import weakref

from tensorkeep.errors import LockedError
from tensorkeep.storage import local as _io

LOCK_NAME = ".tensorkeep.lock"
_HELD: weakref.WeakSet[RunLock] = weakref.WeakSet()  # this process's held locks, for _drop_in_child


def _drop_in_child() -> None:
    """In a forked child: close the inherited lock descriptors and forget the locks.

    An ``flock`` belongs to the open file description, which parent and child share: it is
    released when the last descriptor on it closes. Closing the child's copy drops only the
    child's reference, so the parent keeps its lock and the child never prolongs it. The child
    must not release (unlink) the parent's lock file either: it no longer holds the lock."""
    for lock in list(_HELD):
        fd, lock._fd, lock.held = lock._fd, -1, False
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_in_child)


class RunLock:
    """An exclusive lock on a run directory, released by :meth:`release` or by the owner's death.

    >>> import tempfile; d = tempfile.mkdtemp()
    >>> a = RunLock(d); a.acquire()
    >>> RunLock(d).acquire()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    tensorkeep.errors.LockedError: ... is already open by another CheckpointManager in this process; ...
    >>> a.release()
    """

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, LOCK_NAME)
        self.held = False
        self._fd = -1

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(5):
            try:
                fd = _io.open_lock_file(self.path)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                raise LockedError(
                    f"{self.path} is a symbolic link, not tensorkeep's lock file: it is not written "
                    "through. Fix: remove that link (it is not the lock of a running job)"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refusal(me, child_holds=True) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                owner = self._owner()  # no flock here: trust the pid in the file
                if owner and owner != me and not self._stale(owner):
                    os.close(fd)
                    raise self._refusal(me, child_holds=False) from None
            try:  # its previous holder may have unlinked the file between our open and flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            try:
                _io.ftruncate(fd, 0)
                _io.pwrite_all(fd, memoryview(json.dumps(me).encode()), 0)
                _io.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd, self.held = fd, True
            _HELD.add(self)
            return
        raise LockedError(f"could not take the lock {self.path}: it keeps being replaced by another process")

    def _refusal(self, me: dict, child_holds: bool) -> LockedError:
        run, owner = os.path.dirname(self.path), self._owner() or {"pid": "?", "host": "?"}
        if owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
            return LockedError(
                f"{run} is already open by another CheckpointManager in this process; "
                "close it first (mgr.close() or a with block)"
            )
        if (
            child_holds
            and owner.get("host") == me["host"]
            and type(owner.get("pid")) is int
            and not _io.pid_alive(owner["pid"])
        ):
            return LockedError(
                f"{run} was opened by process {owner['pid']}, which is gone, but another process still holds the "
                "lock: one it forked outside Python's os.fork (a C extension's fork(), which skips the hook that "
                "closes the lock in children) or one in another PID namespace (a container on this volume). "
                f"Find it with `fuser {self.path}` and stop it."
            )
        return LockedError(
            f"{run} is in use by process {owner.get('pid')} on {owner.get('host')}: two processes writing one run "
            "would interleave checkpoints. Stop that process, or use another directory."
        )

    def _owner(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.loads(f.read() or "null")
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def _stale(owner: dict) -> bool:
        pid = owner.get("pid")
        if owner.get("host") != socket.gethostname() or type(pid) is not int:
            return False  # another host's lock: we cannot tell, so we do not steal it
        return not _io.pid_alive(pid)

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in this order, see the inode check in acquire)."""
        if self.held:
            self.held = False
            _HELD.discard(self)
            try:
                _io.unlink(self.path)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
            finally:
                os.close(self._fd)
                self._fd = -1
