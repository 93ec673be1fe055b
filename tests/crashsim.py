"""Simulated power loss: record the file-system operations of a real save, then enumerate the
on-disk states a power cut at any point of it could leave, and check each one with a fresh load.

The model (ALICE, OSDI'14; SQLite's crash VFS), per cut point k in the operation log:

* File data: a write (split into 4 KiB pages, so torn writes are modelled) or a truncate is
  durable once a later ``fsync`` of the *same inode* (before k) returned.  Any other write or
  truncate before k may or may not have reached the disk, independently of the others (a subset);
  a lost write may still have extended the file (the size was journaled, the data not: zeros).
* Directory operations (create, mkdir, rename/replace, renameat2 exchange, unlink, rmdir, the
  unlinks of an rmtree) reach the disk in the order they were made: the persisted ones are a
  prefix of the log's.  The prefix covers at least every operation on a directory that a later
  ``fsync_dir`` (before k) of that directory made durable.  A file fsync does not persist its
  name (POSIX does not promise it), a directory fsync does not persist file data.

Files are tracked by identity (inode), not by name: an fd's writes belong to the file it opened,
wherever that file is renamed to.  Every state is built from a snapshot of the directory taken
before the recorded save.

Recording patches the functions of ``tensorkeep.storage.local`` (every tensorkeep mutation goes through
them, by ``_io.<name>`` attribute lookup), and for the comparison runs Python's ``builtins.open``
(write modes) and ``os.replace``.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import math
import os
import random
import shutil
import tempfile
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tensorkeep.storage import local as _io

PAGE = 4096
DEFAULT_SAMPLES = 2000  # crash states sampled per scenario (tests: --crash-samples; bench/reliability.py: --samples)
NS_KINDS = {"create", "mkdir", "link", "rename", "exchange", "unlink", "rmdir"}
DATA_KINDS = {"write", "truncate"}
ROOT = 0


@dataclass
class Op:
    kind: str  # create mkdir link rename exchange unlink rmdir | write truncate | fsync fsync_dir
    ino: int = -1  # the file written/truncated/fsynced/created, or the directory fsynced/made
    path: str = ""  # relative to the recorded root
    dst: str = ""
    offset: int = 0
    data: bytes = b""
    size: int = 0
    parents: tuple[int, ...] = ()  # the directories a namespace operation changes

    def __repr__(self) -> str:
        if self.kind == "write":
            return f"write(#{self.ino}, {self.offset}, {len(self.data)} B)"
        if self.kind == "truncate":
            return f"truncate(#{self.ino}, {self.size})"
        if self.kind in ("fsync", "fsync_dir"):
            return f"{self.kind}(#{self.ino})"
        if self.kind in ("rename", "exchange"):
            return f"{self.kind}({self.path}, {self.dst})"
        return f"{self.kind}({self.path}{', #' + str(self.ino) if self.ino >= 0 else ''})"


@dataclass
class Log:
    dirs: dict[int, dict[str, int]]  # the snapshot's namespace: directory id -> {name: id}
    files: dict[int, bytes]  # the snapshot's file contents
    ops: list[Op] = field(default_factory=list)
    returned_at: int | None = None  # len(ops) when the save returned (confirmed)

    def describe(self) -> str:
        return "\n".join(f"{i:3d} {op!r}" for i, op in enumerate(self.ops))


# ------------------------------------------------------------------------------ namespace model


def _split(rel: str) -> tuple[str, str]:
    d, n = os.path.split(rel)
    return d, n


def _lookup(dirs: dict[int, dict[str, int]], rel: str) -> int:
    cur = ROOT
    for part in [p for p in rel.split("/") if p and p != "."]:
        cur = dirs[cur][part]
    return cur


def _apply_by_parent(dirs: dict[int, dict[str, int]], op: Op) -> None:
    """Apply one namespace operation to the directory it changes, found by identity, not by path:
    under strict POSIX a directory's entries can reach the disk while its own name did not (an
    orphan, unreachable after the crash)."""
    if op.kind in ("create", "mkdir", "link"):
        dirs.setdefault(op.parents[0], {})[_split(op.path)[1]] = op.ino
        dirs.setdefault(op.ino, {}) if op.kind == "mkdir" else None
    elif op.kind in ("unlink", "rmdir"):
        dirs.setdefault(op.parents[0], {}).pop(_split(op.path)[1], None)
    elif op.kind == "rename":
        ino = dirs.setdefault(op.parents[0], {}).pop(_split(op.path)[1], None)
        if ino is not None:
            dirs.setdefault(op.parents[1], {})[_split(op.dst)[1]] = ino
    elif op.kind == "exchange":
        a, b = dirs.setdefault(op.parents[0], {}), dirs.setdefault(op.parents[1], {})
        sn, dn = _split(op.path)[1], _split(op.dst)[1]
        a[sn], b[dn] = b.get(dn), a.get(sn)
        for d, n in ((a, sn), (b, dn)):
            if d[n] is None:
                del d[n]
    else:
        raise AssertionError(op)


def _apply_ns(dirs: dict[int, dict[str, int]], op: Op) -> None:
    """Apply one namespace operation to a (copied-on-write) directory model."""
    if op.kind in ("create", "mkdir", "link"):
        d, n = _split(op.path)
        dirs[_lookup(dirs, d)][n] = op.ino
        if op.kind == "mkdir":
            dirs[op.ino] = {}
    elif op.kind in ("unlink", "rmdir"):
        d, n = _split(op.path)
        dirs[_lookup(dirs, d)].pop(n)
    elif op.kind == "rename":
        (sd, sn), (dd, dn) = _split(op.path), _split(op.dst)
        ino = dirs[_lookup(dirs, sd)].pop(sn)
        dirs[_lookup(dirs, dd)][dn] = ino
    elif op.kind == "exchange":
        (sd, sn), (dd, dn) = _split(op.path), _split(op.dst)
        a, b = dirs[_lookup(dirs, sd)], dirs[_lookup(dirs, dd)]
        a[sn], b[dn] = b[dn], a[sn]
    else:
        raise AssertionError(op)


def _copy_dirs(dirs: dict[int, dict[str, int]]) -> dict[int, dict[str, int]]:
    return {k: dict(v) for k, v in dirs.items()}


# ------------------------------------------------------------------------------ recorder


class Recorder:
    """Records (and performs) the file-system operations made under ``root`` while active."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self._next = 1
        self._ids: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) -> model id
        dirs: dict[int, dict[str, int]] = {ROOT: {}}
        files: dict[int, bytes] = {}
        st = os.lstat(self.root)
        self._ids[(st.st_dev, st.st_ino)] = ROOT

        def walk(real: str, did: int) -> None:
            for e in sorted(os.scandir(real), key=lambda e: e.name):
                i = self._new_id(e.path)
                dirs[did][e.name] = i
                if e.is_dir(follow_symlinks=False):
                    dirs[i] = {}
                    walk(e.path, i)
                else:
                    with builtins.open(e.path, "rb") as f:
                        files[i] = f.read()

        walk(self.root, ROOT)
        self.log = Log(_copy_dirs(dirs), files)
        self.dirs = dirs  # the live shadow namespace
        self.lock = threading.RLock()

    # identity ---------------------------------------------------------------------------
    def _new_id(self, real_path: str | None = None, fd: int | None = None) -> int:
        st = os.fstat(fd) if fd is not None else os.lstat(real_path)  # type: ignore[arg-type]
        i = self._next
        self._next += 1
        self._ids[(st.st_dev, st.st_ino)] = i  # a reused inode number is a new file
        return i

    def _id_of_fd(self, fd: int) -> int:
        st = os.fstat(fd)
        return self._ids[(st.st_dev, st.st_ino)]

    def rel(self, path: Any) -> str:
        p = os.path.abspath(os.fspath(path))
        r = os.path.relpath(p, self.root)
        if r == ".." or r.startswith("../"):
            raise AssertionError(f"the recorded save touched {p}, outside {self.root}")
        return "" if r == "." else r

    def _parent(self, rel: str) -> int:
        return _lookup(self.dirs, _split(rel)[0])

    def _add(self, op: Op) -> None:
        with self.lock:
            self.log.ops.append(op)
            if op.kind in NS_KINDS:
                _apply_ns(self.dirs, op)

    # recorded operations ----------------------------------------------------------------
    def created(self, path: Any, fd: int | None = None, kind: str = "create") -> int:
        rel = self.rel(path)
        with self.lock:
            i = self._new_id(os.path.abspath(os.fspath(path)), fd)
            self._add(Op(kind, ino=i, path=rel, parents=(self._parent(rel),)))
        return i

    def write(self, fd: int, offset: int, data: bytes) -> None:
        with self.lock:
            self._add(Op("write", ino=self._id_of_fd(fd), offset=offset, data=bytes(data)))

    def write_ino(self, ino: int, offset: int, data: bytes) -> None:
        self._add(Op("write", ino=ino, offset=offset, data=bytes(data)))

    def truncate(self, ino: int, size: int) -> None:
        self._add(Op("truncate", ino=ino, size=size))

    def fsync(self, fd: int) -> None:
        with self.lock:
            self._add(Op("fsync", ino=self._id_of_fd(fd)))

    def fsync_dir(self, path: Any) -> None:
        with self.lock:
            self._add(Op("fsync_dir", ino=_lookup(self.dirs, self.rel(path))))

    def rename(self, src: Any, dst: Any, kind: str = "rename") -> None:
        s, d = self.rel(src), self.rel(dst)
        with self.lock:
            self._add(Op(kind, path=s, dst=d, parents=(self._parent(s), self._parent(d))))

    def linked(self, src: Any, dst: Any) -> None:
        s, d = self.rel(src), self.rel(dst)
        with self.lock:
            self._add(Op("link", ino=_lookup(self.dirs, s), path=d, parents=(self._parent(d),)))

    def unlink(self, path: Any, kind: str = "unlink") -> None:
        r = self.rel(path)
        with self.lock:
            self._add(Op(kind, path=r, parents=(self._parent(r),)))

    def removed_tree(self, path: Any) -> None:
        """rmtree: every entry's unlink, children before their directory."""
        top = self.rel(path)

        def rm(rel: str) -> None:
            ino = _lookup(self.dirs, rel)
            if ino in self.dirs:
                for name in sorted(self.dirs[ino]):
                    rm(f"{rel}/{name}")
                self.unlink(os.path.join(self.root, rel), "rmdir")
            else:
                self.unlink(os.path.join(self.root, rel))

        with self.lock:
            rm(top)

    # patching ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def patched(
        self,
        *,
        builtin_open: bool = False,
        no_file_fsync: bool = False,
        no_dir_fsync: bool = False,
        no_parent_fsync: bool = False,
    ) -> Iterator[Recorder]:
        """Record tensorkeep's ``_io`` calls (and, with ``builtin_open``, Python's open/os.replace)."""
        real = {
            n: getattr(_io, n)
            for n in (
                "open_new",
                "open_lock_file",
                "pwrite_all",
                "ftruncate",
                "fsync",
                "fsync_dir",
                "replace",
                "rename",
                "unlink",
                "rmtree",
                "mkdir",
                "rmdir",
                "link",
                "_exchange",
            )
        }
        rec = self

        def open_new(path, direct=False):
            fd = real["open_new"](path, direct)
            rec.created(path, fd)
            return fd

        def open_lock_file(path):
            existed = os.path.lexists(path)
            fd = real["open_lock_file"](path)
            if not existed:
                rec.created(path, fd)
            return fd

        def pwrite_all(fd, buf, offset):
            real["pwrite_all"](fd, buf, offset)
            rec.write(fd, offset, bytes(buf))

        def ftruncate(fd, size):
            real["ftruncate"](fd, size)
            with rec.lock:
                rec.truncate(rec._id_of_fd(fd), size)

        def fsync(fd):
            if no_file_fsync:
                return
            real["fsync"](fd)
            rec.fsync(fd)

        def fsync_dir(path):
            if no_dir_fsync:
                return
            real["fsync_dir"](path)
            rec.fsync_dir(path)

        def replace(src, dst):
            with rec.lock:
                real["replace"](src, dst)
                rec.rename(src, dst)

        def rename(src, dst):
            with rec.lock:
                real["rename"](src, dst)
                rec.rename(src, dst)

        def unlink(path):
            with rec.lock:
                real["unlink"](path)
                rec.unlink(path)

        def rmtree(path):
            with rec.lock:
                rec_ops = len(rec.log.ops)
                shadow = _copy_dirs(rec.dirs)
                try:
                    rec.removed_tree(path)
                    real["rmtree"](path)
                except BaseException:
                    rec.dirs = shadow
                    del rec.log.ops[rec_ops:]
                    raise

        def mkdir(path):
            real["mkdir"](path)
            rec.created(path, kind="mkdir")

        def rmdir(path):
            with rec.lock:
                real["rmdir"](path)
                rec.unlink(path, "rmdir")

        def link(src, dst):
            with rec.lock:
                real["link"](src, dst)
                rec.linked(src, dst)

        def _exchange(a, b):
            with rec.lock:
                ok = real["_exchange"](a, b)
                if ok:
                    rec.rename(a, b, "exchange")
                return ok

        patches = dict(
            open_new=open_new,
            open_lock_file=open_lock_file,
            pwrite_all=pwrite_all,
            ftruncate=ftruncate,
            fsync=fsync,
            fsync_dir=fsync_dir,
            replace=replace,
            rename=rename,
            unlink=unlink,
            rmtree=rmtree,
            mkdir=mkdir,
            rmdir=rmdir,
            link=link,
            _exchange=_exchange,
        )
        if no_parent_fsync:  # the bug variant: a new directory's parent is never fsynced
            real_makedirs = _io.makedirs
            patches["makedirs"] = lambda path, durable=True: real_makedirs(path, False)
        real_open, real_os_replace = builtins.open, os.replace

        class RecFile(io.FileIO):
            """A raw (unbuffered) file whose writes are recorded at their offsets."""

            def __init__(self, path: str, mode: str, ino: int) -> None:
                super().__init__(path, mode)
                self.ino = ino

            def write(self, b):  # type: ignore[override]
                off = self.tell()
                n = super().write(b)
                rec.write_ino(self.ino, off, bytes(memoryview(b)[:n]))
                return n

        def rec_open(file, mode="r", *a, **kw):
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and not a and not kw:
                p = os.path.abspath(os.fspath(file))
                if not (os.path.relpath(p, rec.root) + "/").startswith("../"):
                    assert "b" in mode and mode.replace("b", "") in ("w", "x"), f"unmodelled open mode {mode}"
                    existed = os.path.lexists(p)
                    f = RecFile(p, mode.replace("b", ""), -1)
                    with rec.lock:
                        if existed:  # O_TRUNC on the existing file
                            f.ino = rec._id_of_fd(f.fileno())
                            rec.truncate(f.ino, 0)
                        else:
                            f.ino = rec.created(p, f.fileno())
                    return f
            return real_open(file, mode, *a, **kw)

        def rec_os_replace(src, dst, **kw):
            with rec.lock:
                real_os_replace(src, dst, **kw)
                rec.rename(src, dst)

        try:
            for n, f in patches.items():
                setattr(_io, n, f)
            if builtin_open:
                builtins.open, os.replace = rec_open, rec_os_replace
            yield self
            self.log.returned_at = len(self.log.ops)
        finally:
            for n, f in real.items():
                setattr(_io, n, f)
            builtins.open, os.replace = real_open, real_os_replace


# ------------------------------------------------------------------------------ crash states


@dataclass
class Item:
    """One unit that may or may not survive: a page of a write, or a truncate."""

    pos: int  # log index (items are applied in log order)
    ino: int
    offset: int = 0
    data: bytes = b""
    size: int = -1  # >= 0: a truncate


def _items(log: Log, k: int) -> tuple[list[Item], list[Item]]:
    """(durable, unsynced) data items of the ops before cut k."""
    last_fsync: dict[int, int] = {}
    for i, op in enumerate(log.ops[:k]):
        if op.kind == "fsync":
            last_fsync[op.ino] = i
    durable, loose = [], []
    for i, op in enumerate(log.ops[:k]):
        if op.kind not in DATA_KINDS:
            continue
        if op.kind == "truncate":
            pieces = [Item(i, op.ino, size=op.size)]
        else:
            pieces, off, mv = [], op.offset, op.data
            while mv:
                n = min(len(mv), PAGE - off % PAGE)
                pieces.append(Item(i, op.ino, off, mv[:n]))
                off, mv = off + n, mv[n:]
        (durable if last_fsync.get(op.ino, -1) > i else loose).extend(pieces)
    return durable, loose


def _ns_range(log: Log, k: int) -> tuple[list[Op], int]:
    """The namespace ops before cut k, and how many of them are certainly durable (a prefix)."""
    ns = [(i, op) for i, op in enumerate(log.ops[:k]) if op.kind in NS_KINDS]
    last_dir_fsync: dict[int, int] = {}
    for i, op in enumerate(log.ops[:k]):
        if op.kind == "fsync_dir":
            last_dir_fsync[op.ino] = i
    must = 0
    for j, (i, op) in enumerate(ns):
        if any(last_dir_fsync.get(p, -1) > i for p in op.parents):
            must = j + 1
    return [op for _, op in ns], must


def build_state(
    log: Log,
    ns: list[Op],
    prefix: int,
    durable: list[Item],
    loose: list[Item],
    keep: list[bool],
    extend: bool,
    strict: bool = False,
) -> tuple[tuple, ...]:
    """The directory tree after the crash: sorted (path, None for a directory | bytes).
    ``strict``: ``ns[:prefix]`` is any chosen subset (in log order), applied by directory identity."""
    dirs = _copy_dirs(log.dirs)
    for op in ns[:prefix]:
        (_apply_by_parent if strict else _apply_ns)(dirs, op)
    chosen = sorted(durable + [it for it, kp in zip(loose, keep) if kp], key=lambda it: it.pos)
    lost_ends: dict[int, list[tuple[int, int]]] = {}
    if extend:
        for it, kp in zip(loose, keep):
            if not kp and it.size < 0:
                lost_ends.setdefault(it.ino, []).append((it.pos, it.offset + len(it.data)))
    contents: dict[int, bytes] = {}

    def content(ino: int) -> bytes:
        if ino not in contents:
            buf = bytearray(log.files.get(ino, b""))
            last_trunc = -1
            for it in chosen:
                if it.ino != ino:
                    continue
                if it.size >= 0:
                    del buf[it.size :]
                    buf.extend(bytes(it.size - len(buf)))
                    last_trunc = it.pos
                else:
                    if len(buf) < it.offset:
                        buf.extend(bytes(it.offset - len(buf)))
                    buf[it.offset : it.offset + len(it.data)] = it.data
            ends = [e for p, e in lost_ends.get(ino, []) if p > last_trunc]
            if ends and max(ends) > len(buf):
                buf.extend(bytes(max(ends) - len(buf)))
            contents[ino] = bytes(buf)
        return contents[ino]

    out: list[tuple[str, Any]] = []

    def walk(did: int, rel: str) -> None:
        for name, ino in dirs[did].items():
            p = f"{rel}/{name}" if rel else name
            if ino in dirs:
                out.append((p, None))
                walk(ino, p)
            else:
                out.append((p, content(ino)))

    walk(ROOT, "")
    return tuple(sorted(out, key=lambda e: e[0]))


def materialize(state: tuple, into: str) -> None:
    if os.path.lexists(into):
        shutil.rmtree(into)
    os.makedirs(into)
    for p, data in state:
        full = os.path.join(into, p)
        if data is None:
            os.makedirs(full, exist_ok=True)
        else:
            with builtins.open(full, "wb") as f:
                f.write(data)


def _ns_by_dir(log: Log, k: int) -> tuple[dict[int, list[Op]], dict[int, int]]:
    """Strict POSIX: the namespace ops before cut k grouped by the directory they change (a rename
    by its destination), and how many of each directory's are certainly durable: those a later
    ``fsync_dir`` of that very directory covers. Nothing orders one directory's against another's."""
    seqs: dict[int, list[tuple[int, Op]]] = {}
    for i, op in enumerate(log.ops[:k]):
        if op.kind in NS_KINDS:
            seqs.setdefault(op.parents[-1], []).append((i, op))
    last_dir_fsync: dict[int, int] = {}
    for i, op in enumerate(log.ops[:k]):
        if op.kind == "fsync_dir":
            last_dir_fsync[op.ino] = i
    must = {
        d: max((j + 1 for j, (i, _) in enumerate(ops) if last_dir_fsync.get(d, -1) > i), default=0)
        for d, ops in seqs.items()
    }
    return {d: [op for _, op in ops] for d, ops in seqs.items()}, must


def strict_crash_states(log: Log, samples: int, rng: random.Random) -> Iterator[tuple[int, tuple]]:
    """Like :func:`crash_states`, under strict POSIX directories: each directory's operations reach the
    disk as a prefix of its own (at least up to its last ``fsync_dir``), independently of every other
    directory's, so a new directory whose parent was never fsynced may vanish with all it holds."""
    order = {id(op): i for i, op in enumerate(log.ops)}
    for k in range(len(log.ops) + 1):
        durable, loose = _items(log, k)
        seqs, must = _ns_by_dir(log, k)
        dirs = sorted(seqs)
        for s in range(samples):
            cut = {
                d: (len(seqs[d]) if s == 0 else must[d] if s == 1 else rng.randint(must[d], len(seqs[d]))) for d in dirs
            }
            chosen = sorted((op for d in dirs for op in seqs[d][: cut[d]]), key=lambda op: order[id(op)])
            p = 1.0 if s == 0 else 0.0 if s == 1 else rng.random()
            keep = [rng.random() < p for _ in loose]
            yield k, build_state(log, chosen, len(chosen), durable, loose, keep, rng.random() < 0.5, strict=True)


def crash_states(log: Log, samples: int, rng: random.Random, enum_limit: int = 1024) -> Iterator[tuple[int, tuple]]:
    """Yield (cut point, state) for every cut k in 0..len(ops): every combination when there are at
    most ``enum_limit``, else ``samples`` spread over the cuts that need sampling (at least 8 each)."""
    n = len(log.ops)
    plans = []
    for k in range(n + 1):
        durable, loose = _items(log, k)
        ns, must = _ns_range(log, k)
        combos = (len(ns) - must + 1) * (2 ** len(loose)) * (2 if loose else 1)
        plans.append((k, durable, loose, ns, must, combos))
    big = [p for p in plans if p[5] > enum_limit]
    per_cut = max(8, math.ceil(samples / len(big))) if big else 0
    for k, durable, loose, ns, must, combos in plans:
        if combos <= enum_limit:
            for prefix in range(must, len(ns) + 1):
                for mask in range(2 ** len(loose)):
                    keep = [bool(mask >> b & 1) for b in range(len(loose))]
                    for extend in (False, True) if loose else (False,):
                        yield k, build_state(log, ns, prefix, durable, loose, keep, extend)
        else:
            for s in range(per_cut):
                prefix = len(ns) if s == 0 else must if s == 1 else rng.randint(must, len(ns))
                p = 1.0 if s == 0 else 0.0 if s == 1 else rng.random()  # all, none, then mixtures
                keep = [rng.random() < p for _ in loose]
                yield k, build_state(log, ns, prefix, durable, loose, keep, rng.random() < 0.5)


# ------------------------------------------------------------------------------ verdicts


@dataclass
class Report:
    name: str
    ops: int = 0
    explored: int = 0  # (cut point, subset) combinations
    distinct: int = 0  # distinct directory states among them, each checked by a fresh load
    corrupt: int = 0  # explored states that load wrong data or raise
    lost: int = 0  # explored states that lose a confirmed save (or every committed version)
    examples: list[str] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)  # verdict label -> explored states

    @property
    def bad(self) -> int:
        return self.corrupt + self.lost

    def row(self) -> str:
        return f"| {self.name} | {self.ops} | {self.explored} | {self.distinct} | {self.corrupt} | {self.lost} |"


def check(
    name: str,
    log: Log,
    verdict: Callable[[str], str],
    *,
    had_old: bool = True,
    samples: int | None = None,
    seed: int = 0,
    enum_limit: int = 1024,
    strict: int = 0,
) -> Report:
    """Run ``verdict`` (a fresh load of a built state -> "old" | "new" | "none" | "corrupt: ...")
    on every crash state of ``log``. Before the save returned, "old" or "new" is right ("none" only
    when there was no old version); after it returned, only "new"."""
    if samples is None:
        samples = DEFAULT_SAMPLES
    rep = Report(name, ops=len(log.ops))
    returned_at = log.returned_at if log.returned_at is not None else len(log.ops)
    cache: dict[bytes, str] = {}
    work = tempfile.mkdtemp(prefix="tk-crash-")
    try:
        states = (
            strict_crash_states(log, strict, random.Random(seed))
            if strict
            else crash_states(log, samples, random.Random(seed), enum_limit)
        )
        for k, state in states:
            h = hashlib.blake2b(repr(state).encode(), digest_size=16).digest()
            if h not in cache:
                into = os.path.join(work, "state")
                materialize(state, into)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        cache[h] = verdict(into)
                    except Exception as e:  # the verdict's own failure is a corrupt state
                        cache[h] = f"corrupt: {type(e).__name__}: {e}"
                rep.distinct += 1
            got = cache[h]
            rep.explored += 1
            rep.outcomes[got.split(":")[0]] += 1
            confirmed = k >= returned_at
            if got.startswith("corrupt"):
                rep.corrupt += 1
                bad = got
            elif got == "new" or (not confirmed and (got == "old" or (got == "none" and not had_old))):
                continue
            else:
                rep.lost += 1
                bad = f"lost: got {got!r} after {'the save returned' if confirmed else 'a crash'}"
            if len(rep.examples) < 5:
                rep.examples.append(
                    f"cut {k} ({log.ops[k - 1] if k else 'start'}): {bad} [{', '.join(p for p, _ in state)}]"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rep


def same(a: Any, b: Any) -> bool:
    """Exact structural equality: tensors by dtype, shape and bits."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(
                a.reshape(-1).view(torch.uint8) if a.numel() else a, b.reshape(-1).view(torch.uint8) if b.numel() else b
            )
        )
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.tobytes() == b.tobytes()
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# ------------------------------------------------------------------------------ scenarios


def payload(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(40, 40, generator=g),
        "b": torch.arange(300, dtype=torch.int16) * (seed + 1),
        "np": np.full(33, seed, dtype=np.float64),
        "step": seed,
    }


def _file_verdict(path: str, old: Any, new: Any, loader: Callable[[str], Any]) -> Callable[[str], str]:
    name = os.path.basename(path)

    def verdict(root: str) -> str:
        p = os.path.join(root, name)
        if not os.path.exists(p):
            return "none"
        got = loader(p)
        return "new" if same(got, new) else "old" if same(got, old) else "corrupt: a tensor that was never saved"

    return verdict


def scenario_tk_save(root: str, **variant: bool) -> tuple[Log, Callable[[str], str]]:
    """``tk.save`` of a new version over an existing file."""
    import tensorkeep as tk

    path, old, new = os.path.join(root, "model.tk"), payload(1), payload(2)
    tk.save(old, path)
    durable = variant.pop("durable", True)
    rec = Recorder(root)
    with rec.patched(**variant):
        tk.save(new, path, durable=durable)
    return rec.log, _file_verdict(path, old, new, tk.load)


def scenario_tk_save_direct(root: str) -> tuple[Log, Callable[[str], str]]:
    """``tk.save`` through its O_DIRECT path (staged aligned writes, then ftruncate)."""
    from tensorkeep import knobs

    saved = knobs.DIRECT_IO_MIN_BYTES, knobs.CHUNK_BYTES
    knobs.DIRECT_IO_MIN_BYTES, knobs.CHUNK_BYTES = 1, 8192
    try:
        return scenario_tk_save(root)
    finally:
        knobs.DIRECT_IO_MIN_BYTES, knobs.CHUNK_BYTES = saved


def _tensors(seed: int) -> dict:
    """6400, 600 and 264 bytes: 2 shards of at most 4000 bytes, 3 of at most 500, one of 100000."""
    p = _torch_payload(seed)
    return {k: v for k, v in p.items() if isinstance(v, torch.Tensor)}


def _sharded_verdict(path: str, old: Any, new: Any) -> Callable[[str], str]:
    """A fresh ``tk.load`` of the model directory (which, like transformers, prefers model.safetensors
    to an index); "none" while it holds no weights. Its config.json must be intact in every state."""
    import tensorkeep as tk

    name = os.path.basename(path)

    def verdict(root: str) -> str:
        p = os.path.join(root, name)
        if os.path.exists(os.path.join(p, "config.json")) or old is not None:
            with builtins.open(os.path.join(p, "config.json"), "rb") as f:
                if f.read() != b'{"hidden": 40}':
                    return "corrupt: config.json changed"
        if not any(os.path.exists(os.path.join(p, n)) for n in ("model.safetensors", "model.safetensors.index.json")):
            return "none"
        got = tk.load(p)
        return "new" if same(got, new) else "old" if same(got, old) else "corrupt: weights that were never saved"

    return verdict


def scenario_sharded(
    root: str, before: int | None = 4000, after: int = 4000, *, no_link: bool = False, **variant: bool
) -> tuple[Log, Callable[[str], str]]:
    """``tk.save_sharded`` into a model directory holding a config.json (and, with ``before``, the
    old weights saved with that shard size: 4000 bytes makes 2 shards, 100000 one file). The same
    names again make the old index point at linked copies first (``no_link``: copied instead)."""
    import tensorkeep as tk

    path = os.path.join(root, "model")
    old, new = (_tensors(1) if before else None), _tensors(2)
    if before:
        os.makedirs(path)
        with builtins.open(os.path.join(path, "config.json"), "wb") as f:
            f.write(b'{"hidden": 40}')
        tk.save_sharded(old, path, max_shard_size=before)
    rec = Recorder(root)
    real_link = _io.link
    if no_link:
        _io.link = lambda a, b: (_ for _ in ()).throw(PermissionError(1, "no hard links here"))
    try:
        with rec.patched(**variant):
            tk.save_sharded(new, path, max_shard_size=after)
    finally:
        _io.link = real_link
    return rec.log, _sharded_verdict(path, old, new)


def scenario_new_run(root: str, **variant: bool) -> tuple[Log, Callable[[str], str]]:
    """``CheckpointManager(run)`` creating ``run`` (and its parent), then ``save(1)``: once it returned,
    the checkpoint must survive, which needs the new directories' parents fsynced."""
    import tensorkeep as tk

    states = {1: _train_state(1)}
    rec = Recorder(root)
    with rec.patched(**variant):
        with tk.CheckpointManager(os.path.join(root, "runs", "mlp")) as mgr:
            mgr.save(1, states[1])
    verdict = _ckpt_verdict(states, sub=os.path.join("runs", "mlp"))
    return rec.log, verdict


def _torch_payload(seed: int) -> dict:
    p = payload(seed)
    p["np"] = torch.from_numpy(p["np"])
    return p


def _torch_load(p: str) -> Any:
    return torch.load(p, weights_only=True)


def scenario_torch_save(root: str) -> tuple[Log, Callable[[str], str]]:
    """``torch.save`` straight over the old file (open(path, "wb"): truncate, then write)."""
    path, old, new = os.path.join(root, "model.pt"), _torch_payload(1), _torch_payload(2)
    torch.save(old, path)
    rec = Recorder(root)
    with rec.patched(builtin_open=True):
        with open(path, "wb") as f:
            torch.save(new, f)
    return rec.log, _file_verdict(path, old, new, _torch_load)


def scenario_torch_tmp_rename(root: str) -> tuple[Log, Callable[[str], str]]:
    """``torch.save`` to a temporary file, then ``os.replace`` over the old one, no fsync."""
    path, old, new = os.path.join(root, "model.pt"), _torch_payload(1), _torch_payload(2)
    torch.save(old, path)
    rec = Recorder(root)
    with rec.patched(builtin_open=True):
        with open(path + ".tmp", "wb") as f:
            torch.save(new, f)
        os.replace(path + ".tmp", path)
    return rec.log, _file_verdict(path, old, new, _torch_load)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(24, 24)


def _train_state(seed: int) -> dict:
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        net = _Net()
    return {"model": net, "w": torch.full((5,), float(seed)), "epoch": seed}


def _ckpt_verdict(states: dict[int, dict], sub: str = "") -> Callable[[str], str]:
    import tensorkeep as tk

    def verdict(root: str) -> str:
        if sub:
            root = os.path.join(root, sub)
            if not os.path.isdir(root):
                return "none"
        target = {"model": _Net(), "w": torch.full((5,), -7.0), "epoch": -1}
        with torch.no_grad():
            for p in target["model"].parameters():
                p.fill_(-7.0)
        from tensorkeep.checkpoint import rng

        before = rng.capture()  # restore() sets the global RNGs: put the caller's back afterwards
        try:
            with tk.CheckpointManager(root) as mgr:
                step = mgr.restore(target)
        finally:
            rng.restore(before)
        if step is None:
            return "none"
        want = states.get(step)
        if want is None:
            return f"corrupt: restored step {step}, never saved"
        ok = (
            same(target["model"].state_dict(), want["model"].state_dict())
            and same(target["w"], want["w"])
            and target["epoch"] == want["epoch"]
        )
        if not ok:
            return f"corrupt: step {step} restored with wrong values"
        return "new" if step == max(states) else "old"

    return verdict


def scenario_checkpoint(
    root: str, *, async_save: bool = False, keep_last: int | None = None, incremental: bool = False, **variant: bool
) -> tuple[Log, Callable[[str], str]]:
    """A committed step 1, then a recorded save of step 2 (for async: save() then wait()).
    Incremental: a frozen tensor of step 1's pack is reused by step 2."""
    import tensorkeep as tk

    states = {1: _train_state(1), 2: _train_state(2)}
    if incremental:
        frozen = torch.arange(3000.0)
        states[1]["w"] = states[2]["w"] = frozen
    mgr = tk.CheckpointManager(root, async_save=async_save, keep_last=keep_last, incremental=incremental)
    try:
        mgr.save(1, states[1])
        mgr.wait()
        rec = Recorder(root)
        with rec.patched(**variant):
            mgr.save(2, states[2])
            mgr.wait()
    finally:
        mgr.close()
    return rec.log, _ckpt_verdict(states)


SCENARIOS: dict[str, Callable[[str], tuple[Log, Callable[[str], str]]]] = {
    "tk.save over the old file": scenario_tk_save,
    "tk.save over the old file, O_DIRECT path": scenario_tk_save_direct,
    "tk.save_sharded over old shards of the same names (old index points at links first)": scenario_sharded,
    "tk.save_sharded over old shards of the same names, no hard links (copies)": lambda r: scenario_sharded(
        r, no_link=True
    ),
    "tk.save_sharded: 2 shards over one file": lambda r: scenario_sharded(r, before=100_000),
    "tk.save_sharded: one file over 2 shards": lambda r: scenario_sharded(r, after=100_000),
    "tk.save_sharded: 3 shards over 2": lambda r: scenario_sharded(r, after=500),
    "CheckpointManager.save (sync)": scenario_checkpoint,
    "CheckpointManager.save (async_save=True, then wait())": lambda r: scenario_checkpoint(r, async_save=True),
    "retention cleanup (keep_last=1)": lambda r: scenario_checkpoint(r, keep_last=1),
    "incremental checkpoint + pack cleanup (keep_last=1)": lambda r: scenario_checkpoint(
        r, keep_last=1, incremental=True
    ),
    "comparison: torch.save over the old file": scenario_torch_save,
    "comparison: torch.save to temp file + os.replace, no fsync": scenario_torch_tmp_rename,
    "comparison: tk.save(durable=False) (temp file + rename, no fsync)": lambda r: scenario_tk_save(r, durable=False),
    "bug variant: tk.save without the file fsync": lambda r: scenario_tk_save(r, no_file_fsync=True),
    "bug variant: tk.save without the directory fsync": lambda r: scenario_tk_save(r, no_dir_fsync=True),
    "bug variant: checkpoint without the file fsyncs": lambda r: scenario_checkpoint(r, no_file_fsync=True),
    "bug variant: checkpoint without the directory fsyncs": lambda r: scenario_checkpoint(r, no_dir_fsync=True),
}

#: Run under strict POSIX directories (:func:`strict_crash_states`): nothing orders two directories' entries.
STRICT: dict[str, Callable[[str], tuple[Log, Callable[[str], str]]]] = {
    "strict POSIX: CheckpointManager creates runs/mlp, then save(1)": scenario_new_run,
    "strict POSIX: tk.save_sharded into a new directory": lambda r: scenario_sharded(r, before=None),
    "strict POSIX bug variant: new directories' parents not fsynced": lambda r: scenario_new_run(
        r, no_parent_fsync=True
    ),
}


def run(name: str, samples: int | None = None, seed: int = 0, enum_limit: int = 1024) -> tuple[Report, Log]:
    root = tempfile.mkdtemp(prefix="tk-rec-")
    try:
        log, verdict = (STRICT.get(name) or SCENARIOS[name])(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if name in STRICT:  # the run directory did not exist before: "none" is fine until save() returned
        return check(name, log, verdict, had_old=False, seed=seed, strict=min(samples or 50, 50)), log
    return check(name, log, verdict, samples=samples, seed=seed, enum_limit=enum_limit), log
