"""One writer per run directory: a lock file holding the owner's pid and host."""

from __future__ import annotations

import errno
import json
import os
import socket
import time

from .. import _io
from ..errors import LockedError

LOCK_NAME = ".tensorkeep.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory. A lock left by a dead process on this host is taken over."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, LOCK_NAME)
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = _io.open_new(self.path)
            except FileExistsError:
                owner = self._owner()
                if owner is None and self._young():
                    owner = {"pid": "?", "host": "?"}  # being written right now by its owner
                elif owner is None or self._stale(owner):
                    _io.unlink_if_exists(self.path)  # stale: its owner is gone
                    continue
                if owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
                    raise LockedError(f"{os.path.dirname(self.path)} is already open by another CheckpointManager "
                                      "in this process; close it first (mgr.close() or a with block)")
                raise LockedError(
                    f"{os.path.dirname(self.path)} is in use by process {owner.get('pid')} on {owner.get('host')}: two "
                    "processes writing one run would interleave checkpoints. Stop that process, or use another "
                    f"directory. If it is gone (e.g. another machine died), delete {self.path}."
                )
            try:
                _io.pwrite_all(fd, memoryview(json.dumps(me).encode()), 0)
                _io.fsync(fd)
            finally:
                os.close(fd)
            self.held = True
            return
        raise LockedError(f"could not take the lock {self.path}: it keeps reappearing")

    def _owner(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.loads(f.read() or "null")
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def _young(self) -> bool:
        try:
            return time.time() - os.stat(self.path).st_mtime < 10
        except OSError:
            return False

    @staticmethod
    def _stale(owner: dict) -> bool:
        pid = owner.get("pid")
        if owner.get("host") != socket.gethostname() or type(pid) is not int:
            return False  # another host's lock: we cannot tell, so we do not steal it
        return not _alive(pid)

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                _io.unlink(self.path)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
