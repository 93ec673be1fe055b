"""Checkpoints on object storage (``s3://bucket/run``, ``memory://run``): the manifest commits.

    s3://bucket/run/
      .tensorkeep.owner                  the manager that opened the run last (advisory, see OwnerRecord)
      step_00001000/manifest.json        written last: the checkpoint exists once it does
      step_00001000/model.3f9a1c2e.tk    the data objects of the save that wrote that manifest
      packs/00001000-81b0d4f7.tk         incremental checkpoints, as on disk (see packs.py)

Object stores have no rename. A save uploads every data object first, under names carrying a
fresh token (so re-saving a step never touches the objects its committed manifest refers to),
then writes ``manifest.json``: one PUT, all or nothing, which makes the checkpoint exist.
Readers (``steps``, ``restore``, ``list_checkpoints``) ignore step prefixes without a manifest.
Retention deletes the manifest first, then the other objects, then the packs no manifest needs.
What no manifest refers to (the objects of a failed or killed save, those of a step saved
again) and unfinished multipart uploads are deleted when a manager opens the run.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tensorkeep import knobs
from tensorkeep.checkpoint import layout, packs
from tensorkeep.checkpoint.info import CheckpointInfo
from tensorkeep.checkpoint.layout import MANIFEST, Manifest
from tensorkeep.checkpoint.manifest import readable
from tensorkeep.core.format import CRC_FIELD_END, TK_PREFIX, check_stored, seal
from tensorkeep.errors import FormatError, LockedError, SaveError, TensorkeepError
from tensorkeep.file.reader import read_file as load
from tensorkeep.file.writer import write
from tensorkeep.storage.objects import Store

OWNER = ".tensorkeep.owner"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
#: The names of the data objects a save writes (``model.3f9a1c2e.tk``): cleanup deletes only these.
_OBJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,120}\.[0-9a-f]{8}\.tk$")


def ours(name: str) -> bool:
    """A step's object that tensorkeep wrote (a data object's name, or the manifest).

    >>> ours("model.3f9a1c2e.tk"), ours("manifest.json"), ours("notes.txt")
    (True, True, False)
    """
    return name == MANIFEST or bool(_OBJECT_RE.match(name))


def step_key(step: int) -> str:
    return f"step_{step:08d}"


def _own_key(key: str) -> bool:
    """A key of the run that tensorkeep writes: a step's object or a pack."""
    top, _, rest = key.partition("/")
    return bool((_STEP_RE.match(top) and ours(rest)) or (top == packs.PACKS and layout.PACK_RE.match(rest)))


class OwnerRecord:
    """Who writes a run on object storage: advisory, the last manager to open the run wins.

    An object store has no ``flock``, and a lock left by a preempted job cannot be told from a
    live one (another host, another clock), so tensorkeep does not pretend to lock. Opening a
    run writes ``.tensorkeep.owner`` (host, pid, a random token, time); every commit and every
    retention pass first reads it back, and a manager whose record a later one replaced raises
    :class:`LockedError` instead of writing. Between that check and the write (milliseconds)
    two writers can still interleave: running one job per run is the scheduler's task.
    """

    def __init__(self, store: Store) -> None:
        self.store, self.token, self.held = store, os.urandom(8).hex(), False

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "time": time.time()}
        data = json.dumps(me).encode()
        self.store.write(OWNER, [data], len(data))
        self.held = True

    def check(self, what: str) -> None:
        try:
            owner = json.loads(self.store.read(OWNER))
        except (FileNotFoundError, ValueError):
            owner = None
        if isinstance(owner, dict) and owner.get("token") == self.token:
            return
        who = (
            f"process {owner.get('pid')} on {owner.get('host')}, {time.time() - float(owner.get('time', 0)):.0f} s ago"
            if isinstance(owner, dict)
            else "its owner record is gone"
        )
        raise LockedError(
            f"{self.store.url}: {what} refused: another CheckpointManager opened this run after this one "
            f"({who}), so this one no longer writes to it. Two writers would interleave checkpoints: "
            "stop one of them (on object storage the newest manager wins)"
        )

    def release(self) -> None:
        self.held = False  # the record stays: it only says which manager opened the run last


class ObjectRun:
    """A run on object storage (a :class:`~tensorkeep.checkpoint.run.Run`)."""

    local = False
    builds_images = False  # objects are streamed to the store by the writer thread

    def __init__(self, store: Store) -> None:
        self.store = store
        self.url = store.url
        self.lock = OwnerRecord(self.store)

    def prepare(self, durable: bool) -> None:
        pass  # a prefix exists once something is written below it

    def step_url(self, step: int) -> str:
        return self.store.url_of(step_key(step))

    step_path = step_url

    # ------------------------------------------------------------------ reading

    def groups(self) -> dict[int, dict[str, int]]:
        """``{step: {name: size}}`` of every step prefix, committed or not (one listing)."""
        out: dict[int, dict[str, int]] = {}
        for key, size in self.store.list("").items():
            top, _, rest = key.partition("/")
            m = _STEP_RE.match(top)
            if m and rest and "/" not in rest:
                out.setdefault(int(m.group(1)), {})[rest] = size
        return out

    def steps(self) -> list[int]:
        """Steps whose manifest exists, ascending."""
        return sorted(s for s, names in self.groups().items() if MANIFEST in names)

    def read_manifest(self, step: int) -> Manifest:
        key = f"{step_key(step)}/{MANIFEST}"
        try:
            raw = self.store.read(key)
        except FileNotFoundError:
            raise FormatError(
                f"{self.step_url(step)}: no {MANIFEST} (no such checkpoint, or its save did not finish)"
            ) from None
        return layout.parse_manifest(raw, self.store.url_of(key))

    def manifests(self) -> dict[int, Manifest]:
        """The readable manifests by step (a damaged one is left out: restore skips it with a warning)."""
        return readable(self.steps(), self.read_manifest)

    def committed(self) -> list[Manifest] | None:
        """Every committed manifest; None if one cannot be read (then no pack may be deleted)."""
        try:
            return [self.read_manifest(s) for s in self.steps()]
        except FormatError:
            return None

    def check(
        self, step: int, m: Manifest, names: dict[str, int] | None = None, pack_sizes: dict[str, int] | None = None
    ) -> None:
        """Every object the manifest lists exists with its recorded size and header checksum (sizes from
        one listing, ``names``/``pack_sizes`` when the caller has them)."""
        where, prefix = self.step_url(step), step_key(step)
        if names is None:
            names = {k[len(prefix) + 1 :]: n for k, n in self.store.list(prefix + "/").items()}
        sizes = (pack_sizes if pack_sizes is not None else self.store.list(f"{packs.PACKS}/")) if m.packs else {}
        listed = [(f"{prefix}/{n}", n, names.get(n), info) for n, info in m.files.items()]
        listed += [
            (f"{packs.PACKS}/{p}", f"{packs.PACKS}/{p}", sizes.get(f"{packs.PACKS}/{p}"), info)
            for p, info in m.packs.items()
        ]
        for key, name, size, info in listed:
            head = self.store.read_range(key, 0, CRC_FIELD_END) if size is not None else b""
            check_stored(where, name, None if size is None else (size, head), info)

    def load(self, step: int, m: Manifest) -> tuple[Manifest, dict[str, Any]]:
        """Every file and part of a checkpoint, checked against the manifest and verified."""
        self.check(step, m)
        loaded = {name: load(self.store.url_of(f"{step_key(step)}/{name}")) for name in m.files}
        located = {p: (self.store.url_of(f"{packs.PACKS}/{p}"), (i["size"], i["crc32"])) for p, i in m.packs.items()}
        loaded.update(packs.load_parts(m.parts, located, self.step_url(step)))
        return m, loaded

    # ------------------------------------------------------------------ writing

    def commit(
        self,
        step: int,
        payload: dict[str, tuple[str, str, Any]],
        m: Manifest,
        *,
        incremental: bool,
        durable: bool = True,
    ) -> str:
        """Upload every data object, then the manifest (the commit); returns the step's URL."""
        prefix, token = step_key(step), os.urandom(4).hex()
        written: list[str] = []
        try:
            if incremental:
                m.parts, m.packs, m.bytes_written, m.bytes_held = self._save_parts(step, token, payload, written)
            else:
                for name, (key, kind, obj) in payload.items():
                    obj_name = f"{name[: -len('.tk')]}.{token}.tk"
                    written.append(f"{prefix}/{obj_name}")
                    size, crc = write(obj, self.store.url_of(written[-1]), {}, True)
                    m.files[obj_name] = {"size": size, "crc32": crc, "key": key, "kind": kind}
            self.lock.check(f"committing step {step}")
        except BaseException as e:
            self._forget(written)
            if isinstance(e, TensorkeepError) and isinstance(e, OSError):
                raise SaveError(
                    f"checkpoint step {step} was not saved to {self.url}: {e} Nothing of it was "
                    "committed (it has no manifest); every committed checkpoint is intact."
                ) from e
            raise
        data = seal(m.to_json())
        try:
            self.store.write(f"{prefix}/{MANIFEST}", [data], len(data))  # the commit: one PUT, all or nothing
        except SaveError as e:
            raise SaveError(
                f"checkpoint step {step}: writing its manifest failed: {e} The write is all or nothing, "
                f"so step {step} either exists whole or not at all (steps() of a new manager tells); "
                "every other checkpoint is intact."
            ) from e
        names = self.store.list(prefix + "/")  # objects of an earlier save of this step, now unreferenced
        self._forget(
            k
            for k in names
            if k[len(prefix) + 1 :] not in m.files and ours(k[len(prefix) + 1 :]) and not k.endswith("/" + MANIFEST)
        )
        return self.step_url(step)

    def _save_parts(self, step: int, token: str, payload: dict, written: list[str]) -> tuple[dict, dict, int, int]:
        """packs.save_parts on object storage: the tensors no committed checkpoint holds go to one new pack."""
        manifests = self.committed() or []
        known = packs.index(manifests)
        info = {p: i for mf in manifests for p, i in mf.packs.items()}
        with ThreadPoolExecutor(max(1, knobs.IO_THREADS), thread_name_prefix="tk-hash") as pool:
            parts, by_hash, sizes = packs.split(payload, pool)
        stored = self.store.list(f"{packs.PACKS}/") if known else {}
        where = packs.reusable(known, by_hash, lambda pack: self._locate_pack(pack, info.get(pack), stored), self.url)
        new = {h: x for h, x in by_hash.items() if h not in where}
        written_bytes = 0
        if new:
            pack = f"{step:08d}-{token}.tk"
            written.append(f"{packs.PACKS}/{pack}")
            size, crc = write(new, self.store.url_of(written[-1]), {}, True)
            info[pack], written_bytes = {"size": size, "crc32": crc}, size
            where.update((h, pack) for h in new)
        for part in parts.values():
            part["tensors"] = {leaf: [h, where[h]] for leaf, h in part["tensors"].items()}
        used = sorted({p for part in parts.values() for _, p in part["tensors"].values()})
        return parts, {p: info[p] for p in used}, written_bytes, sum(sizes.values())

    def _locate_pack(self, pack: str, info: dict | None, stored: dict[str, int]) -> tuple[str, tuple]:
        """A pack's URL and identity (size, header checksum), once it is as a committed manifest recorded it."""
        key = f"{packs.PACKS}/{pack}"
        if info is None:
            raise FormatError(f"{self.url}: no committed checkpoint records the size and checksum of {key}")
        found = (stored[key], self.store.read_range(key, 0, CRC_FIELD_END)) if key in stored else None
        check_stored(self.url, key, found, info)
        return self.store.url_of(key), (info["size"], info["crc32"])

    def _forget(self, keys: Iterable[str]) -> None:
        """Best-effort delete (the store may be unreachable: the next manager's clean() retries)."""
        try:
            self.store.delete(keys)
        except Exception:
            pass

    def remove(self, step: int, durable: bool = True) -> bool:
        """Delete a checkpoint: its manifest first (a crash midway leaves a non-checkpoint whose objects
        the next :meth:`clean` recognizes by name), then its own objects; anything else stays."""
        self.lock.check(f"deleting step {step}")
        prefix = step_key(step)
        self.store.delete([f"{prefix}/{MANIFEST}"])
        self.store.delete(k for k in self.store.list(prefix + "/") if ours(k[len(prefix) + 1 :]))
        return True

    def collect(self) -> list[str]:
        """Delete the packs no committed manifest refers to (nothing while one is unreadable)."""
        stored = self.store.list(f"{packs.PACKS}/")
        manifests = self.committed() if stored else None
        if manifests is None:
            return []
        live = {p for mf in manifests for p in mf.packs}
        doomed = [
            k
            for k in stored
            if k[len(packs.PACKS) + 1 :] not in live
            and layout.PACK_RE.match(k[len(packs.PACKS) + 1 :])
            and self.store.read_range(k, 0, 8 + len(TK_PREFIX))[8:] == TK_PREFIX
        ]
        self.store.delete(doomed)
        return doomed

    def clean(self) -> None:
        """Delete what no manifest refers to (with a warning for each unfinished checkpoint removed).

        Of step prefixes without a manifest, and of objects a step's manifest does not list, only the
        names tensorkeep gives its objects (:func:`ours`); unfinished multipart uploads; unreferenced
        packs. A step whose manifest is unreadable is left alone, and so is every other object."""
        for step, names in self.groups().items():
            prefix = step_key(step)
            if MANIFEST not in names:
                mine = [n for n in names if ours(n)]
                if mine:
                    warnings.warn(f"removed the leftovers of an unfinished save: {self.step_url(step)}", stacklevel=4)
                    self.store.delete(f"{prefix}/{n}" for n in mine)
                continue
            try:
                m = self.read_manifest(step)
            except FormatError:
                continue
            self.store.delete(f"{prefix}/{n}" for n in names if n != MANIFEST and n not in m.files and ours(n))
        self.store.abort_uploads("", only=_own_key)
        self.collect()

    def list_checkpoints(self, verify: bool) -> list[CheckpointInfo]:
        """:func:`tensorkeep.list_checkpoints` of a run on object storage (two listings, one read per manifest)."""
        return _list(self, verify)


def _list(run: ObjectRun, verify: bool) -> list[CheckpointInfo]:
    pack_sizes = run.store.list(f"{packs.PACKS}/")
    out = []
    for step, names in sorted(run.groups().items()):
        size, where = sum(names.values()), run.step_url(step)
        if MANIFEST not in names:
            out.append(CheckpointInfo(step, where, "uncommitted", bytes_held=size, bytes_written=size))
            continue
        info = CheckpointInfo(step, where, "ok", bytes_held=size, bytes_written=size)
        try:
            m = run.read_manifest(step)
            info.time, info.metrics = m.time, dict(m.metrics)
            if m.parts:
                info.bytes_held, info.bytes_written = m.bytes_held or 0, (m.bytes_written or 0) + size
            run.check(step, m, names, pack_sizes)
            if verify:
                for name in m.files:
                    load(run.store.url_of(f"{step_key(step)}/{name}"))
                for pack in m.packs:
                    load(run.store.url_of(f"{packs.PACKS}/{pack}"))
        except FormatError as e:
            info.status = f"damaged: {e}"
        out.append(info)
    return out
