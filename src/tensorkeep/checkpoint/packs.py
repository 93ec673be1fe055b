"""Incremental checkpoints: every tensor stored once, by content, in pack files the run shares.

    run/
      packs/00001000-3f9a1c2e.tk      the tensors step 1000 had to write, named by content hash
      packs/00002000-81b0d4f7.tk      step 2000 wrote only what changed (trainable layers)
      step_00002000/manifest.json     structure of each part + {tensor: [hash, pack]} + packs it needs

A tensor whose content hash a kept checkpoint already holds is not written again: frozen
layers of a fine-tuning run are written by the first checkpoint only. A save refers to a pack
only after checking it (:func:`reusable`): its size and header checksum, and the checksums of
the tensors it reuses from it (once per process while the file is unchanged). A pack that is
missing or damaged is treated as absent: what the save needs from it is written again. A pack is deleted
only when no committed manifest refers to it, and manifests are deleted first, so a crash
during cleanup leaves unreferenced packs (removed by the next cleanup), never a checkpoint
whose data is gone. A pack written by a save that crashed before its manifest is likewise
unreferenced and removed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from tensorkeep import knobs, threads
from tensorkeep.checkpoint.layout import PACK_RE, Manifest, list_steps, read_manifest, step_dir
from tensorkeep.core.format import TK_PREFIX
from tensorkeep.core.tree import flatten, unflatten
from tensorkeep.errors import FormatError, SaveError, StorageError
from tensorkeep.file import stored
from tensorkeep.file.reader import open_reader
from tensorkeep.file.safeopen import SafeOpen
from tensorkeep.file.writer import _source, write
from tensorkeep.storage import local as _io
from tensorkeep.storage.disk import DiskBackend

PACKS = "packs"
_PIECE = 16 << 20  # hashed in pieces on IO_THREADS threads (hashlib releases the GIL)


def packs_dir(run: str) -> str:
    return os.path.join(run, PACKS)


def content_hash(dtype: str, shape: tuple[int, ...], data: np.ndarray, pool: ThreadPoolExecutor) -> Callable[[], str]:
    """Start hashing: SHA-256 over the dtype, the shape and the SHA-256 of each 16 MiB piece of
    the bytes (pieces of every tensor run on the pool at once); call the result for the hex digest.

    >>> with ThreadPoolExecutor(1) as p: content_hash("F32", (2,), np.zeros(8, np.uint8), p)()[:12]
    'c7ee54b02b5b'
    """
    mv = memoryview(data)  # type: ignore[arg-type]  # numpy's stubs: ndarray.__buffer__ only on Python >= 3.12
    pieces = [
        threads.submit(pool, lambda m: hashlib.sha256(m).digest(), mv[i : i + _PIECE])
        for i in range(0, len(mv), _PIECE)
    ]

    def digest() -> str:
        h = hashlib.sha256(f"{dtype}{list(shape)}".encode())
        for f in pieces:
            h.update(f.result())
        return h.hexdigest()

    return digest


def split(
    payload: dict[str, tuple[str, str, Any]], pool: ThreadPoolExecutor
) -> tuple[dict, dict[str, Any], dict[str, int]]:
    """Each part's structure and ``{tensor: hash}``; the tensors by hash; their sizes by hash."""
    parts: dict[str, dict[str, Any]] = {}
    pending = []
    for name, (key, kind, obj) in payload.items():
        tree, leaves = flatten(obj)
        parts[name] = {"key": key, "kind": kind, "tree": tree, "tensors": {}}
        for leaf, x in leaves:
            dt, shape, get = _source(x, name, leaf)
            data = get()
            pending.append((parts[name]["tensors"], leaf, x, data.nbytes, content_hash(dt, shape, data, pool)))
    by_hash: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    for tensors, leaf, x, n, digest in pending:
        h = tensors[leaf] = digest()
        by_hash.setdefault(h, x)
        sizes[h] = n
    return parts, by_hash, sizes


def committed(run: str) -> list[Manifest] | None:
    """The manifests of every committed checkpoint; None if one cannot be read (then nobody can
    tell which packs it needs, so nothing may be deleted)."""
    try:
        return [read_manifest(step_dir(run, s)) for s in list_steps(run)]
    except FormatError:
        return None


def index(manifests: list[Manifest]) -> dict[str, str]:
    """hash -> the pack holding it, over the given (kept, committed) checkpoints."""
    out: dict[str, str] = {}
    for m in manifests:
        for part in m.parts.values():
            for h, pack in part["tensors"].values():
                out[h] = pack
    return out


def save_parts(
    run: str, step: int, payload: dict[str, tuple[str, str, Any]], known: dict[str, str], durable: bool
) -> tuple[dict[str, dict], dict[str, dict], int, int]:
    """Write the tensors of ``payload`` that ``known`` (hash -> pack, see :func:`index`) does not
    hold, or holds in a pack that fails its checks (:func:`reusable`), into one new pack.

    Returns the manifest's ``parts`` and ``packs`` entries, the bytes written and the bytes held.
    """
    with ThreadPoolExecutor(max(1, knobs.IO_THREADS), thread_name_prefix="tk-hash") as pool:
        parts, by_hash, sizes = split(payload, pool)
    infos = {p: i for m in committed(run) or [] for p, i in m.packs.items()}
    where = reusable(known, by_hash, lambda pack: _locate(run, pack, infos.get(pack)), run=run)
    new = {h: x for h, x in by_hash.items() if h not in where}
    written = 0
    if new:
        if os.path.lexists(packs_dir(run)) and not _io.is_real_dir(packs_dir(run)):
            raise SaveError(
                errno.ENOTDIR,
                f"{packs_dir(run)} is not a directory (a symlink?): tensorkeep writes a "
                "run's packs only inside the run directory. Fix: move it away",
            )
        _io.makedirs(packs_dir(run), durable)
        pack = f"{step:08d}-{os.urandom(4).hex()}.tk"
        size, crc = write(
            new, os.path.join(packs_dir(run), pack), {}, durable
        )  # temp file + fsync + rename + dir fsync
        infos[pack], written = {"size": size, "crc32": crc}, size
        where.update((h, pack) for h in new)
    for part in parts.values():
        part["tensors"] = {leaf: [h, where[h]] for leaf, h in part["tensors"].items()}
    used = sorted({p for part in parts.values() for _, p in part["tensors"].values()})
    return parts, {p: infos[p] for p in used}, written, sum(sizes.values())


# pack path or URL -> (the file's identity, hashes of the tensors in it this process verified)
_verified: dict[str, tuple[tuple, set[str]]] = {}
_verified_lock = threading.Lock()


def _locate(run: str, pack: str, info: dict | None) -> tuple[str, tuple]:
    """A local pack's path and identity (device, inode, size, times), once it passes
    :func:`check_packs` against what a committed manifest recorded of it."""
    if info is None:
        raise FormatError(f"{run}: no committed checkpoint records the size and checksum of {PACKS}/{pack}")
    check_packs(run, {pack: info}, run)
    p = os.path.abspath(os.path.join(packs_dir(run), pack))
    return p, _identity(p)


def _identity(path: str) -> tuple:
    """What changes when a file is replaced or written to (a flipped bit by the disk itself does not:
    that is found by restore, which verifies everything it reads)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def mark_verified(path: str, ident: tuple, hashes: Iterable[str]) -> None:
    """Record that the tensors ``hashes`` of the pack at ``path`` (a path or URL whose identity is
    ``ident``) were read and verified by this process: :func:`reusable` need not read them again."""
    with _verified_lock:
        seen = _verified.get(path)
        if seen is None or seen[0] != ident:
            seen = _verified[path] = (ident, set())
        seen[1].update(hashes)


def _verify(path: str, ident: tuple, hashes: list[str]) -> None:
    """Check the tensors ``hashes`` of one pack (those this process has not verified in this very
    file), streaming through one buffer of ``knobs.TASK_BYTES``: no tensor is allocated whole."""
    with _verified_lock:
        seen = _verified.get(path)
        done = seen[1] if seen is not None and seen[0] == ident else set()
        todo = [h for h in hashes if h not in done]
    if not todo:
        return

    r = open_reader(path)
    try:
        if r.torch_pickle or r.crcs is None:
            raise FormatError(f"{path}: not a tensorkeep pack (no checksums)")
        span = max(1, knobs.TASK_BYTES // r.block) * r.block
        buf = np.empty(span, np.uint8)
        for h in todo:
            if h not in r.header.tensors:
                raise FormatError(f"{path}: does not hold tensor {h[:12]}…, which a checkpoint puts there")
            n = r.header.tensors[h].nbytes
            for at in range(0, max(n, 1), span):
                r.read_verified(h, buf[: min(span, n - at)], at // r.block, True)
    finally:
        r.close()
    mark_verified(path, ident, todo)


def reusable(
    known: dict[str, str], wanted: Iterable[str], locate: Callable[[str], tuple[str, tuple]], run: str
) -> dict[str, str]:
    """The entries of ``known`` (hash -> pack) for the hashes in ``wanted`` that a new checkpoint may
    refer to instead of writing them: ``locate(pack)`` checks the pack's size and header checksum
    against the manifests (raising FormatError/OSError) and returns its path or URL and identity,
    then each tensor reused from it is verified, once per process while that identity holds.

    A pack that fails is left out, with a warning naming it: the save writes those tensors again
    (a damaged pack must never be the only copy of a new checkpoint's data).

    >>> reusable({}, ["ab12"], lambda pack: ("", ()), run="run")
    {}
    """
    by_pack: dict[str, list[str]] = {}
    for h in wanted:
        if h in known:
            by_pack.setdefault(known[h], []).append(h)
    out: dict[str, str] = {}
    for pack, hashes in sorted(by_pack.items()):
        try:
            path, ident = locate(pack)
            _verify(path, ident, hashes)
        except StorageError:
            raise  # the store is unreachable: that says nothing about the pack
        except (FormatError, OSError) as e:
            warnings.warn(
                f"{run}: {PACKS}/{pack} is not reused: {e}. The {len(hashes)} tensor(s) this checkpoint "
                f"needs from it are written again; the older checkpoints that need {PACKS}/{pack} are "
                "damaged (restore skips them)",
                stacklevel=3,
            )
            continue
        out.update((h, pack) for h in hashes)
    live, prefix = set(known.values()), (os.path.abspath(packs_dir(run)) + os.sep, f"{run}/{PACKS}/")
    with _verified_lock:  # forget the packs of this run that no checkpoint refers to any more
        for k in [k for k in _verified if k.startswith(prefix) and k.rsplit("/", 1)[-1] not in live]:
            del _verified[k]
    return out


def check_packs(run: str, packs: dict[str, dict], where: str) -> None:
    """Every pack a checkpoint needs exists with its recorded size and header checksum."""
    b = DiskBackend(packs_dir(run))
    for pack, info in packs.items():
        stored.check(b, pack, info, where, f"{PACKS}/{pack}")


def locate_local(run: str, packs: dict[str, dict], where: str) -> dict[str, tuple[str, tuple]]:
    """pack -> (its path, its identity), once each passes :func:`check_packs` (for :func:`load_parts`)."""
    check_packs(run, packs, where)
    out = {}
    for pack in packs:
        p = os.path.abspath(os.path.join(packs_dir(run), pack))
        out[pack] = (p, _identity(p))
    return out


def load_parts(parts: dict[str, dict], located: dict[str, tuple[str, tuple]], where: str) -> dict[str, Any]:
    """Rebuild every part of a checkpoint from its packs, every tensor verified.

    ``located``: pack -> (path or URL, identity), for the packs the checkpoint needs, checked by the
    caller (:func:`locate_local` on disk; a run on object storage checks its own)."""
    where_is = {pack: loc[0] for pack, loc in located.items()}
    ident = {pack: loc[1] for pack, loc in located.items()}
    opened = {pack: SafeOpen(where_is[pack]) for pack in located}
    try:
        out = {}
        for name, part in parts.items():

            def get(leaf: str, kind: str, part: dict = part, name: str = name) -> Any:
                if leaf not in part["tensors"]:
                    raise FormatError(f"{where}: part {name!r} refers to tensor {leaf!r} but lists no hash for it")
                h, pack = part["tensors"][leaf]
                if pack not in opened or h not in opened[pack]:
                    raise FormatError(
                        f"{where}: tensor {leaf!r} of {name!r} should be {h[:12]}… in {PACKS}/{pack}, "
                        "which does not hold it"
                    )
                x = opened[pack].get(h)
                mark_verified(where_is[pack], ident[pack], [h])  # a save after restore() need not read it again
                if kind == "t":
                    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x
                return x.numpy() if isinstance(x, torch.Tensor) else x

            out[name] = unflatten(part["tree"], get, f"{where} ({name})")
        return out
    finally:
        for f in opened.values():
            f.close()


def _own_pack(d: str, name: str) -> bool:
    """A file of ``packs/`` that tensorkeep wrote: a pack's name and a tensorkeep header, or the
    temporary file of a pack write whose process died. Anything else there is the user's."""
    p = os.path.join(d, name)
    if not _io.is_regular_file(p):
        return False
    t = _io.temp_of(name)
    if t is not None:
        return bool(PACK_RE.match(t[0])) and _io.is_stale_temp(name, d)
    if not PACK_RE.match(name):
        return False
    with open(p, "rb") as f:
        return f.read(8 + len(TK_PREFIX))[8:] == TK_PREFIX


def collect(run: str) -> list[str]:
    """Delete the packs no committed checkpoint refers to (nothing while a manifest is unreadable).

    Only the run's writer may call this, between saves: a pack being written is not referenced yet.
    Files in ``packs/`` that tensorkeep did not write are left alone (see :func:`_own_pack`).
    """
    d = packs_dir(run)
    if not _io.is_real_dir(d):
        return []  # not an incremental run (or a symlink: never followed)
    manifests = committed(run)
    if manifests is None:
        return []
    live = {p for m in manifests for p in m.packs}
    doomed = sorted(n for n in os.listdir(d) if n not in live and _own_pack(d, n))
    for n in doomed:
        _io.unlink_if_exists(os.path.join(d, n))
    if doomed:
        _io.fsync_dir(d)
    return doomed
