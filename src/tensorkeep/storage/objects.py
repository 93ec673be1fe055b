"""Object storage behind one narrow interface: read a range, write a whole object, list, delete.

Local paths never come here (they keep the direct-I/O, fsync and rename code of ``_io``).
A URL that fsspec understands (``s3://bucket/run``, ``memory://run``, ``gs://…``) is a
:class:`Store` rooted at that URL; keys are ``/``-separated paths below it. ``file://`` URLs
are plain local paths (:func:`local_path`).

Writes are whole objects: on S3 an object appears complete or not at all (the previous
version stays readable until the new one is complete), so there are no temporary names. Large
objects go to S3 as a multipart upload whose parts are sent in parallel (:data:`PART_BYTES`,
:data:`THREADS`); other stores get the object in one ``pipe_file`` call.

fsspec and s3fs are optional (``pip install 'tensorkeep[s3]'``) and imported on first use.
Endpoints, credentials and retries come from fsspec's configuration
(``fsspec.config.conf["s3"] = {"endpoint_url": ...}``) or the usual ``AWS_*`` variables.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from tensorkeep import threads
from tensorkeep.errors import SaveError, StorageError, TensorkeepError
from tensorkeep.storage.base import check_key

#: Size of each part of a multipart upload and of each ranged read (S3's minimum part is 5 MiB).
PART_BYTES = 16 << 20
#: Parts uploaded, or ranges read, at the same time.
THREADS = 8
#: S3 allows at most this many parts in one upload; larger objects get larger parts.
MAX_PARTS = 10_000

_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}


def _filesystem(url: str) -> tuple[Any, str]:
    scheme = url.split("://", 1)[0].lower()
    hint = (
        f"pip install 'tensorkeep[{_EXTRAS[scheme]}]'"
        if _EXTRAS.get(scheme) == "s3"
        else "pip install fsspec and the fsspec backend for this scheme (e.g. gcsfs, adlfs)"
    )
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise ImportError(f"{url}: reading and writing URLs needs fsspec; {hint}") from None
    try:
        return url_to_fs(url)
    except ImportError as e:
        raise ImportError(f"{url}: the {scheme}:// backend is not installed ({e}); {hint}") from None
    except ValueError as e:
        if "not known" in str(e) or "not available" in str(e):
            raise ImportError(f"{url}: fsspec does not know the scheme {scheme!r} ({e}); {hint}") from None
        raise


class Store:
    """One prefix of an object store, read and written by key (a :class:`~tensorkeep.storage.base.Backend`).

    >>> s = Store("memory://tk-doc-store")
    >>> s.write("a/b.bin", [b"hello ", b"world"], 11)
    >>> s.read_range("a/b.bin", 6, 11), s.list("a/")
    (b'world', {'a/b.bin': 11})
    """

    local = False

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, root = _filesystem(self.url)
        self.root = root.rstrip("/")
        self.s3 = callable(getattr(self.fs, "call_s3", None))

    def path(self, key: str) -> str:
        raise TypeError(f"{self.url}: objects are not files")

    def open(self, key: str) -> ObjectSource:
        return ObjectSource(self, key)

    def url_of(self, key: str) -> str:
        return f"{self.url}/{key}" if key else self.url

    def _path(self, key: str) -> str:
        return f"{self.root}/{check_key(self.url, key)}"

    def _call(self, what: str, key: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run one backend call; its failures become FileNotFoundError or StorageError naming the URL."""
        try:
            return fn(*args, **kw)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url_of(key)}: no such object") from None
        except TensorkeepError:
            raise
        except Exception as e:
            raise StorageError(
                f"{self.url_of(key)}: {what} failed: {type(e).__name__}: {e}. Check that the "
                "object store is reachable and the credentials and endpoint are right"
            ) from e

    # ----------------------------------------------------------------- read

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of an object (fewer if it is shorter)."""
        if start < 0:
            raise ValueError(f"{self.url_of(key)}: a range cannot start at {start}")
        if end <= start:
            return b""
        try:
            return self._call("reading", key, self.fs.cat_file, self._path(key), start=start, end=end)
        except StorageError as e:  # S3 answers 416 (s3fs: EINVAL) to a range that starts at or past the end
            if isinstance(e.__cause__, OSError) and e.__cause__.errno == errno.EINVAL and start >= self.size(key):
                return b""
            raise

    def read(self, key: str) -> bytes:
        return self._call("reading", key, self.fs.cat_file, self._path(key))

    def size(self, key: str) -> int:
        self.fs.invalidate_cache()
        info = self._call("looking up", key, self.fs.info, self._path(key))
        if info.get("type", "file") != "file":
            raise FileNotFoundError(f"{self.url_of(key)}: no such object (a prefix of other objects)")
        return int(info["size"])

    def exists(self, key: str) -> bool:
        self.fs.invalidate_cache()
        return bool(self._call("looking up", key, self.fs.isfile, self._path(key)))

    def list(self, prefix: str = "") -> dict[str, int]:
        """``{key: size}`` of every object whose key starts with ``prefix`` (a ``dir/`` or ``""``)."""
        self.fs.invalidate_cache()
        base = self.root + "/"
        where = base + prefix
        top = base + prefix.rpartition("/")[0]  # the deepest directory holding every match
        try:
            found = self._call("listing", prefix, self.fs.find, top.rstrip("/") or base, detail=True)
        except FileNotFoundError:
            return {}
        return {
            p[len(base) :]: int(i.get("size") or 0)
            for p, i in found.items()
            if p.startswith(where) and i.get("type", "file") == "file"
        }

    # ----------------------------------------------------------------- write

    def delete(self, keys: Iterable[str]) -> None:
        """Delete these objects (a missing one is not an error), in one batch where the store has one."""
        keys = list(keys)
        paths = [self._path(k) for k in keys]  # never fs.rm: it expands glob characters
        if self.s3:
            for i in range(0, len(paths), 1000):
                bucket = paths[i].partition("/")[0]
                objs = [{"Key": p.partition("/")[2]} for p in paths[i : i + 1000]]
                out = self._call(
                    "deleting",
                    keys[i],
                    self.fs.call_s3,
                    "delete_objects",
                    Bucket=bucket,
                    Delete={"Objects": objs, "Quiet": True},
                )
                if out.get("Errors"):
                    raise StorageError(f"{self.url}: deleting failed: {out['Errors'][:3]}")
        else:
            for k, p in zip(keys, paths):
                try:
                    self._call("deleting", k, self.fs.rm_file, p)
                except FileNotFoundError:
                    pass
        self.fs.invalidate_cache()

    def write(self, key: str, chunks: Iterable[Any], size: int, *, durable: bool = True) -> None:
        """Write an object from buffers holding ``size`` bytes in all; it appears whole or not at all.

        Raises :class:`SaveError` naming the URL; the previous object, if any, is untouched."""
        try:
            if self.s3 and size > max(PART_BYTES, 5 << 20):
                self._multipart(key, chunks, size)
            else:
                data = b"".join(memoryview(c).cast("B") for c in chunks)
                self._call("writing", key, self.fs.pipe_file, self._path(key), data)
        except OSError as e:  # the store failing (StorageError, not found) or the chunks' source; not our SaveError
            if isinstance(e, TensorkeepError) and not isinstance(e, StorageError):
                raise
            raise SaveError(f"could not save {self.url_of(key)}: {e}. The previous object, if any, is untouched") from e
        self.fs.invalidate_cache()

    def _multipart(self, key: str, chunks: Iterable[Any], size: int) -> None:
        """A multipart upload, parts filled from ``chunks`` by this thread and sent by THREADS others."""
        bucket, _, obj = self._path(key).partition("/")
        part = max(PART_BYTES, 5 << 20, -(-size // MAX_PARTS))
        call = self.fs.call_s3
        upload = self._call("starting an upload of", key, call, "create_multipart_upload", Bucket=bucket, Key=obj)
        uid = upload["UploadId"]
        done: dict[int, dict[str, Any]] = {}
        free = [bytearray(part) for _ in range(THREADS + 1)]
        lock = threading.Lock()

        def send(n: int, buf: bytearray, length: int) -> None:
            body = buf if length == len(buf) else bytes(memoryview(buf)[:length])
            try:
                out = self._call(
                    f"uploading part {n} of",
                    key,
                    call,
                    "upload_part",
                    Bucket=bucket,
                    Key=obj,
                    PartNumber=n,
                    UploadId=uid,
                    Body=body,
                )
            finally:
                with lock:
                    free.append(buf)
            done[n] = {
                "PartNumber": n,
                "ETag": out["ETag"],
                **{k: v for k, v in out.items() if k.startswith("Checksum") and k != "ChecksumType"},
            }

        try:
            with ThreadPoolExecutor(THREADS, thread_name_prefix="tk-upload") as pool:
                pending: set[Future] = set()
                n, buf, fill = 1, free.pop(), 0
                for chunk in chunks:
                    mv = memoryview(chunk).cast("B")
                    pos = 0
                    while pos < len(mv):
                        k = min(part - fill, len(mv) - pos)
                        buf[fill : fill + k] = mv[pos : pos + k]
                        fill, pos = fill + k, pos + k
                        if fill == part:
                            pending.add(threads.submit(pool, send, n, buf, fill))
                            n, fill = n + 1, 0
                            while True:  # at most THREADS parts in flight: memory stays bounded
                                for f in [f for f in pending if f.done()]:
                                    pending.discard(f)
                                    f.result()  # a failed part stops the upload now, not after the last one
                                if free:
                                    break
                                wait(pending, return_when=FIRST_COMPLETED)
                            with lock:
                                buf = free.pop()
                if fill:
                    pending.add(threads.submit(pool, send, n, buf, fill))
                for f in pending:
                    f.result()
            self._call(
                "completing the upload of",
                key,
                call,
                "complete_multipart_upload",
                Bucket=bucket,
                Key=obj,
                UploadId=uid,
                MultipartUpload={"Parts": [done[i] for i in sorted(done)]},
            )
        except BaseException:
            try:  # best effort: the store may be unreachable; abort_uploads() at the next start retries
                call("abort_multipart_upload", Bucket=bucket, Key=obj, UploadId=uid)
            except Exception:
                pass
            raise

    def abort_uploads(self, prefix: str = "", only: Callable[[str], bool] | None = None) -> int:
        """Abort unfinished multipart uploads below ``prefix`` (left by a killed process) whose key
        (relative to this store) ``only`` accepts: another tool's upload in flight is not ours to end. S3 only."""
        if not self.s3:
            return 0
        bucket, _, obj = f"{self.root}/{prefix}".partition("/")
        base = self.root.partition("/")[2]
        out = self._call(
            "listing uploads of", prefix, self.fs.call_s3, "list_multipart_uploads", Bucket=bucket, Prefix=obj
        )
        uploads = [
            u
            for u in out.get("Uploads") or []
            if only is None or (u["Key"].startswith(base + "/") and only(u["Key"][len(base) + 1 :]))
        ]
        for u in uploads:
            self._call(
                "aborting an upload of",
                prefix,
                self.fs.call_s3,
                "abort_multipart_upload",
                Bucket=bucket,
                Key=u["Key"],
                UploadId=u["UploadId"],
            )
        return len(uploads)


#: The first ranged read of an object fetches this much, which holds most headers whole.
HEAD_BYTES = 64 << 10


class ObjectSource:
    """An object opened for ranged reads: its size looked up once, its first bytes fetched once."""

    mappable = False
    identity: tuple[int, ...] | None = None  # an object's bytes are not pinned by anything cheap to ask for

    def __init__(self, store: Store, key: str) -> None:
        self.store, self.key, self.name = store, key, store.url_of(key)
        self.size = store.size(key)
        self._head = store.read_range(key, 0, min(self.size, HEAD_BYTES))

    def pread(self, n: int, at: int) -> bytes:
        if at + n <= len(self._head):
            return self._head[at : at + n]
        return self.store.read_range(self.key, at, at + n)

    def readinto(self, buf: Any, at: int) -> int:
        """Fill ``buf``: one ranged read, or PART_BYTES ranges on THREADS threads."""
        mv = memoryview(buf).cast("B")
        got = [0]

        def fetch(off: int) -> None:
            n = min(PART_BYTES, len(mv) - off)
            data = self.store.read_range(self.key, at + off, at + off + n)
            mv[off : off + len(data)] = data
            got[0] += len(data)  # a short range only at the end, so the total tells

        if len(mv) <= PART_BYTES:
            fetch(0)
        else:
            with ThreadPoolExecutor(THREADS, thread_name_prefix="tk-get") as pool:
                threads.map(pool, fetch, range(0, len(mv), PART_BYTES))
        return got[0]

    def fileno(self) -> int:
        raise TypeError(f"{self.name}: an object cannot be mapped")

    def whole(self) -> Any:
        import io

        return io.BytesIO(self.store.read(self.key))

    def close(self) -> None:
        pass
