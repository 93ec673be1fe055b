"""The storage conformance suite (conformance.py) on each backend: local disk, fsspec ``memory://`` and S3.

S3 is moto's server on 127.0.0.1 (tests/s3server.py, one per module: the ``s3_server`` fixture in
conftest.py); each test gets a fresh prefix of one bucket. No backend has known bugs today; a new
one may list its own in ``known_bugs`` (strict xfails: fixing one makes its test say to drop the entry).
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from conformance import BackendTests, Fault, payload

from tensorkeep.errors import SaveError
from tensorkeep.storage import backend as open_backend
from tensorkeep.storage import local as _io
from tensorkeep.storage.disk import DiskBackend

# ---------------------------------------------------------------------------------- known bugs


@contextmanager
def _raising(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, exc: BaseException) -> Iterator[None]:
    """While entered, ``owner.name(...)`` raises ``exc``."""

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise exc

    with monkeypatch.context() as m:
        m.setattr(owner, name, fail)
        yield


# ---------------------------------------------------------------------------------- local disk

DISK_FAULTS = {  # the _io function that fails, and how
    "EIO": ("pwrite_all", OSError(errno.EIO, "Input/output error")),
    "ENOSPC": ("pwrite_all", OSError(errno.ENOSPC, "No space left on device")),
    "permission": ("open_new", PermissionError(errno.EACCES, "Permission denied")),
    "not-found": ("open_new", FileNotFoundError(errno.ENOENT, "No such file or directory")),
    "fsync-EIO": ("fsync", OSError(errno.EIO, "Input/output error")),
    "rename-EXDEV": ("replace", OSError(errno.EXDEV, "Invalid cross-device link")),
}


class TestDisk(BackendTests):
    @pytest.fixture
    def backend(self, tmp_path):
        return DiskBackend(str(tmp_path / "root"))

    @pytest.fixture(params=list(DISK_FAULTS))
    def fault(self, request, monkeypatch):
        name, exc = DISK_FAULTS[request.param]
        return Fault(lambda: _raising(monkeypatch, _io, name, exc))

    def leftovers(self, backend: Any) -> list[str]:
        """Temporary files anywhere below the root."""
        return [f for _, _, files in os.walk(backend.root) for f in files if _io.temp_of(f)]

    def test_a_durable_write_fsyncs_the_file_then_renames_then_fsyncs_the_directory(self, backend, monkeypatch):
        backend.write("k", [b"old"], 3)
        calls: list[str] = []
        monkeypatch.setattr(_io, "fsync", lambda fd: calls.append("fsync file"))
        monkeypatch.setattr(_io, "fsync_dir", lambda path: calls.append(f"fsync dir {path}"))
        real_replace = _io.replace
        monkeypatch.setattr(_io, "replace", lambda a, b: (calls.append("rename"), real_replace(a, b)))
        backend.write("k", [b"new"], 3)
        assert calls == ["fsync file", "rename", f"fsync dir {backend.root}"]
        calls.clear()
        backend.write("k", [b"not durable"], 11, durable=False)
        assert calls == ["rename"] and backend.read("k") == b"not durable"

    def test_a_failed_directory_fsync_says_the_new_file_is_in_place(self, backend, monkeypatch):
        """The one failure after the publish: the new bytes are there, maybe not durable, and the error says so."""
        backend.write("k", [b"old"], 3)
        with _raising(monkeypatch, _io, "fsync_dir", OSError(errno.EIO, "Input/output error")):
            with pytest.raises(SaveError, match="new file is in place"):
                backend.write("k", [b"new"], 3)
        assert backend.read("k") == b"new" and self.leftovers(backend) == []

    STALE = ".k.tk-tmp-999999999-0123abcd"  #: what a writer (pid 999999999: none) killed mid-write left

    def _leave_stale_temp(self, backend: Any) -> None:
        backend.write("k", [b"old"], 3)
        with open(os.path.join(backend.root, self.STALE), "wb") as f:
            f.write(b"partial")

    def test_a_stale_temp_file_is_not_listed(self, backend):
        self._leave_stale_temp(backend)
        assert backend.list() == {"k": 3} and backend.list("k") == {"k": 3}

    def test_the_next_write_removes_a_stale_temp_file(self, backend):
        self._leave_stale_temp(backend)
        assert self.leftovers(backend) == [self.STALE]
        backend.write("k", [b"new"], 3)
        assert self.leftovers(backend) == [] and backend.read("k") == b"new"


# ---------------------------------------------------------------------------------- fsspec memory://


class TestMemory(BackendTests):
    @pytest.fixture
    def backend(self):
        b = open_backend(f"memory://tk-conformance/{uuid.uuid4().hex}")
        yield b
        try:
            b.fs.rm(b.root, recursive=True)
        except FileNotFoundError:
            pass

    @pytest.fixture(params=["EIO", "permission", "not-found"])
    def fault(self, request, backend, monkeypatch):
        exc = {
            "EIO": OSError(errno.EIO, "Input/output error"),
            "permission": PermissionError(errno.EACCES, "Access denied"),
            "not-found": FileNotFoundError(errno.ENOENT, "NoSuchBucket"),
        }[request.param]
        return Fault(lambda: _raising(monkeypatch, backend.fs, "pipe_file", exc))


# ---------------------------------------------------------------------------------- S3 (moto on 127.0.0.1)


class TestS3(BackendTests):
    part_bytes = 5 << 20  # S3's smallest part

    @pytest.fixture
    def backend(self, s3_bucket):
        return open_backend(f"s3://{s3_bucket}/{uuid.uuid4().hex}")

    @pytest.fixture(params=["EIO", "permission", "not-found", "part-refused", "server-gone", "cut-mid-upload"])
    def fault(self, request, backend, s3_server, monkeypatch):
        multipart = request.param in ("part-refused", "cut-mid-upload")
        size = 2 * self.part_bytes + 1000 if multipart else 1000
        if multipart:
            request.getfixturevalue("small_parts")
        if request.param == "server-gone":
            return Fault(lambda: self._cut(s3_server, None), size)
        if request.param == "cut-mid-upload":  # a part is on the wire; the abort cannot reach the server either
            return Fault(lambda: self._cut(s3_server, self.part_bytes // 2), size, after=backend.abort_uploads)
        exc = {
            "EIO": OSError(errno.EIO, "Input/output error"),
            "permission": PermissionError(errno.EACCES, "Access Denied"),
            "not-found": FileNotFoundError(errno.ENOENT, "NoSuchBucket"),
            "part-refused": OSError(errno.EIO, "InternalError"),
        }[request.param]
        refused = {"upload_part"} if request.param == "part-refused" else {"put_object", "upload_part"}
        fs = backend.fs
        real_async, real_sync = fs._call_s3, fs.call_s3

        async def async_call(method: str, *args: Any, **kwargs: Any) -> Any:  # what pipe_file calls
            if method in refused:
                raise exc
            return await real_async(method, *args, **kwargs)

        def sync_call(method: str, *args: Any, **kwargs: Any) -> Any:  # what Store's multipart upload calls
            if method in refused:
                raise exc
            return real_sync(method, *args, **kwargs)

        @contextmanager
        def active() -> Iterator[None]:
            with monkeypatch.context() as m:
                m.setattr(fs, "_call_s3", async_call)
                m.setattr(fs, "call_s3", sync_call)
                yield

        return Fault(active, size)

    @staticmethod
    @contextmanager
    def _cut(server: Any, after: int | None) -> Iterator[None]:
        """The server unreachable: now, or once ``after`` more bytes went to it."""
        if after is None:
            server.proxy.cut()
        else:
            server.proxy.cut_after(after)
        try:
            yield
        finally:
            if server.proxy.down:
                server.proxy.restore()

    def leftovers(self, backend: Any) -> list[str]:
        """Multipart uploads begun below this prefix and neither completed nor aborted."""
        bucket, _, prefix = backend.root.partition("/")
        out = backend.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/")
        return [u["Key"] for u in out.get("Uploads") or []]

    def test_writing_to_a_missing_bucket_is_a_save_error(self, s3_server):
        b = open_backend(f"s3://tk-no-such-bucket/{uuid.uuid4().hex}")
        with pytest.raises(SaveError, match="tk-no-such-bucket"):
            b.write("k", [payload(10)], 10)
