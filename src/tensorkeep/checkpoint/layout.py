"""How a run directory looks on disk, and the manifest that makes a checkpoint exist.

    run/
      .tensorkeep.lock
      step_00001000/            a committed checkpoint: its manifest.json is written last
        model.tk  optimizer.tk  ...  rng.tk  manifest.json
      .step_00002000.tk-tmp-…/  a save in progress (or the leftovers of a crashed one)

A checkpoint is published by renaming its finished, fsynced temporary directory; a
directory without a valid manifest is not a checkpoint. The names of the step directories follow
the run's :class:`Naming` (``step_{step:08d}`` by default; ``checkpoint-{step}`` for a Hugging Face
run, ``checkpoint_{step}`` for Accelerate). A temporary directory that holds :data:`STAGING_MARKER`
was made by :mod:`~tensorkeep.checkpoint.stage`: it is tensorkeep's entirely and removed whole.
"""

from __future__ import annotations

import errno
import json
import math
import numbers
import os
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tensorkeep.checkpoint.naming import DEFAULT, Naming, plain_name
from tensorkeep.core.crc import crc32
from tensorkeep.core.format import dumps, seal, unseal
from tensorkeep.errors import FormatError, SaveError
from tensorkeep.file import stored
from tensorkeep.storage import local as _io
from tensorkeep.storage.disk import DiskBackend

MANIFEST = "manifest.json"
FORMAT = "tensorkeep-checkpoint"
VERSION = 1
VERSION_INCREMENTAL = 2  # tensors live in run/packs (see packs.py); version-1 readers must refuse it
PACK_RE = re.compile(r"^\d{8,}-[0-9a-f]{8}\.tk$")
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


#: The manifest kind of a file tensorkeep did not encode (written by other code into a staged
#: checkpoint): its ``crc32`` is the CRC-32 of the whole file, checked by reading it all.
FILE_KIND = "file"
#: The first file of a staged checkpoint's temporary directory (see stage.py): proves it is ours.
STAGING_MARKER = ".tk-staging.json"
STAGING_FORMAT = "tensorkeep-staging"


@dataclass
class Manifest:
    step: int
    time: float
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"size", "crc32", "key"}
    versions: dict[str, str] = field(default_factory=dict)
    # incremental checkpoints (packs.py): name -> {"key", "kind", "tree", "tensors": {leaf: [hash, pack]}}
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    packs: dict[str, dict[str, Any]] = field(default_factory=dict)  # pack -> {"size", "crc32"}
    bytes_written: int | None = None  # tensor bytes this checkpoint wrote (None: it wrote all it holds)
    bytes_held: int | None = None  # tensor bytes it restores
    environment: Any = None  # what bit-exact resume depends on (determinism.capture()); untrusted JSON

    def to_json(self) -> str:
        metrics = {
            k: ({"$float": repr(v)} if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in self.metrics.items()
        }  # JSON has no NaN/Infinity: a diverged loss is tagged
        d = {
            "format": FORMAT,
            "version": VERSION,
            "step": self.step,
            "time": self.time,
            "metrics": metrics,
            "files": self.files,
            "versions": self.versions,
        }
        if self.environment:
            d["environment"] = self.environment
        if self.parts:
            d.update(
                version=VERSION_INCREMENTAL,
                parts=self.parts,
                packs=self.packs,
                bytes={"written": self.bytes_written, "held": self.bytes_held},
            )
        return dumps(d)


def clean_metrics(metrics: Mapping[str, Any] | None, step: int) -> dict[str, Any]:
    """Metrics as plain Python scalars (NumPy and one-element tensor values unwrapped).

    >>> import numpy as np; clean_metrics({"acc": np.float32(0.5), "loss": float("nan")}, 1)
    {'acc': 0.5, 'loss': nan}
    """
    out: dict[str, Any] = {}
    for k, v in (metrics or {}).items():
        if type(k) is not str or not _utf8(k):
            raise TypeError(f"checkpoint step {step}: metric names must be str (UTF-8, no lone surrogate), got {k!r}")
        if type(v) not in (str, bool, int, float) and callable(getattr(v, "item", None)):
            try:
                v = v.item()  # a NumPy scalar, a 0-d array, a one-element tensor
            except (ValueError, RuntimeError):
                pass
        if isinstance(v, str) and not _utf8(v):
            raise ValueError(f"checkpoint step {step}: metric {k!r} holds a lone surrogate, which UTF-8 cannot store")
        if v is not None and not isinstance(v, (str, bool, numbers.Real)):
            raise TypeError(
                f"checkpoint step {step}: metric {k!r} must be a number or a string, got "
                f"{type(v).__name__}; pass e.g. float(value)"
            )
        out[k] = v if v is None or isinstance(v, (str, bool, int, float)) else float(v)
    return out


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _untag(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"$float"} and v["$float"] in ("nan", "inf", "-inf"):
        return float(v["$float"])
    return v


def read_manifest(directory: str) -> Manifest:
    """Read and validate a checkpoint's manifest; :class:`FormatError` if it is missing or bad."""
    path = os.path.join(directory, MANIFEST)
    if os.path.lexists(path) and not _io.is_regular_file(path):  # a FIFO would block open() forever
        raise FormatError(f"{path}: not a regular file")
    try:
        with open(path, "rb") as f:
            raw = f.read(10_000_001)
    except FileNotFoundError:
        raise FormatError(f"{directory}: no {MANIFEST} (the save did not finish)") from None
    return parse_manifest(raw, path)


def parse_manifest(raw: bytes, path: str) -> Manifest:
    """Validate a manifest's bytes (``path`` names it in errors); :class:`FormatError` if bad.

    The JSON is untrusted: any value of the wrong kind (a NUL in a file name, ``"time": "soon"``,
    a number too large for a float) makes the checkpoint damaged, never another exception."""
    if len(raw) > 10_000_000:
        raise FormatError(f"{path}: manifest larger than 10 MB")
    d = unseal(raw, path)  # a flipped bit anywhere is damage, not a wrong restore
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise FormatError(f"{path}: not a tensorkeep checkpoint manifest")
    if d.get("version") not in (VERSION, VERSION_INCREMENTAL) or type(d.get("version")) is not int:
        raise FormatError(
            f"{path}: manifest version {d.get('version')!r}; this tensorkeep reads versions "
            f"{VERSION} and {VERSION_INCREMENTAL}: upgrade tensorkeep"
        )
    step, files = d.get("step"), d.get("files")
    if type(step) is not int or step < 0 or not isinstance(files, dict) or not isinstance(d.get("metrics"), dict):
        raise FormatError(f"{path}: manifest needs an int step, a files object and a metrics object")
    for name, info in files.items():
        if (
            not plain_name(name)
            or not isinstance(info, dict)
            or type(info.get("size")) is not int
            or info["size"] < 0
            or not all(isinstance(info.get(k, ""), str) for k in ("crc32", "key", "kind"))
        ):
            raise FormatError(
                f"{path}: bad file entry {name!r} (expected a plain file name and "
                '{"size": int, "crc32": str, "key": str, "kind": str})'
            )
    t = d.get("time", 0)
    if type(t) not in (int, float) or not (0 <= t < _MAX_TIME):  # 10**400 cannot become a float
        raise FormatError(f"{path}: 'time' must be seconds since 1970, found {str(t)[:40]!r}")
    for k, v in d["metrics"].items():
        if not (
            v is None
            or type(v) in (str, bool, float)
            or (type(v) is int and abs(v) < 2**63)
            or (isinstance(v, dict) and set(v) == {"$float"} and v["$float"] in ("nan", "inf", "-inf"))
        ):
            raise FormatError(f"{path}: metric {k!r} must be a number, a string or null, found {str(v)[:40]!r}")
    versions = d.get("versions") or {}
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        raise FormatError(f"{path}: 'versions' must map names to version strings")
    env = d.get("environment")  # informational: determinism.differences() copes with any value
    metrics = {k: _untag(v) for k, v in d["metrics"].items()}
    m = Manifest(step, float(t), metrics, files, versions, environment=env)
    if d["version"] == VERSION_INCREMENTAL:
        m.parts, m.packs = _validate_parts(d.get("parts"), d.get("packs"), path)
        b = d.get("bytes")
        if not isinstance(b, dict):
            b = {}
        m.bytes_written, m.bytes_held = b.get("written"), b.get("held")
        if not all(v is None or (type(v) is int and v >= 0) for v in (m.bytes_written, m.bytes_held)):
            raise FormatError(f"{path}: 'bytes' must hold non-negative ints")
    return m


_MAX_TIME = 253402300799  # 9999-12-31T23:59:59Z: the last second datetime can show


def step_dir(run: str, step: int, naming: Naming = DEFAULT) -> str:
    return os.path.join(run, naming.name(step))


def _validate_parts(parts: Any, packs: Any, where: str) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Shape checks of a manifest's ``parts``/``packs`` (the JSON is untrusted); returns them, checked."""
    if not isinstance(parts, dict) or not isinstance(packs, dict):
        raise FormatError(f"{where}: 'parts' and 'packs' must be objects")
    for pack, info in packs.items():
        if (
            not PACK_RE.match(pack)
            or not isinstance(info, dict)
            or type(info.get("size")) is not int
            or info["size"] < 0
            or not isinstance(info.get("crc32"), str)
        ):
            raise FormatError(f"{where}: bad pack entry {pack!r}")
    for name, part in parts.items():
        refs = part.get("tensors") if isinstance(part, dict) else None
        good = (
            plain_name(name)
            and isinstance(refs, dict)
            and isinstance(part.get("key"), str)
            and isinstance(part.get("kind"), str)
            and all(
                type(r) is list and len(r) == 2 and isinstance(r[0], str) and _HASH_RE.match(r[0]) and r[1] in packs
                for r in refs.values()
            )
        )
        if not good:
            raise FormatError(
                f"{where}: bad part entry {name!r} (each tensor must be [sha256, pack listed in 'packs'])"
            )
    return parts, packs


def write_manifest(directory: str, m: Manifest, durable: bool = True) -> None:
    with _io.atomic_file(
        os.path.join(directory, MANIFEST), durable=durable, in_place=True
    ) as fd:  # published with its directory
        _io.pwrite_all(fd, memoryview(seal(m.to_json())), 0)


def check_files(directory: str, m: Manifest) -> None:
    """Every file the manifest lists exists with its recorded size and header checksum (the cheap
    check: it reads a few bytes per file; ``tk.load`` verifies the data itself). A file of kind
    :data:`FILE_KIND` (not a tensorkeep file) is read whole and checked against its CRC-32."""
    b = DiskBackend(directory)
    for name, info in m.files.items():
        if info.get("kind") == FILE_KIND:
            check_whole(directory, name, info)
        else:
            stored.check(b, name, info, directory)


def file_crc(path: str, durable: bool = False) -> tuple[int, str]:
    """``(size, CRC-32 as 8 hex digits)`` of a whole regular file; ``durable``: fsync it too.

    >>> open("/tmp/tk-doc-crc.txt", "wb").write(b"hello"); file_crc("/tmp/tk-doc-crc.txt")
    5
    (5, '3610a686')
    """
    fd = _io.open_regular(path)  # a FIFO would block forever
    try:
        crc, size = 0, 0
        buf = memoryview(bytearray(1 << 23))
        while n := os.readv(fd, [buf]):
            crc = crc32(buf[:n], crc)
            size += n
        if durable:
            _io.fsync(fd)
    finally:
        os.close(fd)
    return size, f"{crc:08x}"


def check_whole(directory: str, name: str, want: Mapping[str, Any]) -> None:
    """A file of kind :data:`FILE_KIND` has the size and whole-file CRC-32 its manifest records."""
    p = os.path.join(directory, name)
    if not os.path.lexists(p):
        raise FormatError(f"{directory}: {name} is missing")
    if not _io.is_regular_file(p):
        raise FormatError(f"{p} is not a regular file")
    size, crc = file_crc(p)
    if size != want["size"] or crc != want.get("crc32"):
        raise FormatError(
            f"{directory}: {name} is {size} bytes with CRC-32 {crc}, the manifest says {want['size']} bytes with "
            f"CRC-32 {want.get('crc32')}: it is not the file this checkpoint wrote (truncated, replaced or damaged). "
            "Fix: restore the previous checkpoint (tensorkeep does so by itself) or put back a good copy"
        )


def list_steps(run: str, naming: Naming = DEFAULT) -> list[int]:
    """Steps of the directories that look committed (named by ``naming`` with a manifest), ascending.
    A symlink named like a step is not one of this run's checkpoints: never read, never deleted."""
    try:
        names = os.listdir(run)
    except FileNotFoundError:
        return []
    steps = []
    for n in names:
        s = naming.step_of(n)
        if (
            s is not None
            and _io.is_real_dir(os.path.join(run, n))
            and _io.is_regular_file(os.path.join(run, n, MANIFEST))
        ):
            steps.append(s)
    return sorted(steps)


#: The names tensorkeep gives the files of a step directory (checkpoint/manager.py, collective.py).
_OWN_FILE_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,120}\.tk|manifest\.json|distributed\.json)$")


def own_names(directory: str) -> tuple[set[str], list[str]]:
    """``(ours, foreign)``: the entries of a step directory that tensorkeep wrote, and the rest.

    Ours are the files its manifest lists, the manifest itself and tensorkeep's temporary names; with
    a damaged manifest, the names tensorkeep gives its files (``*.tk``); with no manifest, nothing
    is provably ours. Subdirectories and symlinks are never ours."""
    names = os.listdir(directory)
    try:
        listed: set[str] | None = set(read_manifest(directory).files) | {MANIFEST}
    except FormatError:
        listed = None
    has_manifest = _io.is_regular_file(os.path.join(directory, MANIFEST))
    ours, foreign = set(), []
    for n in names:
        p = os.path.join(directory, n)
        mine = (n in listed) if listed is not None else (has_manifest and bool(_OWN_FILE_RE.match(n)))
        if (mine or _io.temp_of(n) is not None) and _io.is_regular_file(p):
            ours.add(n)
        else:
            foreign.append(n)
    return ours, sorted(foreign)


def foreign_error(directory: str, foreign: list[str], what: str) -> SaveError:
    shown = ", ".join(repr(n) for n in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    return SaveError(
        errno.EEXIST,
        f"{directory} holds entries tensorkeep did not write ({shown}), so it is not "
        f"{what}. Fix: move them out of it (or delete it yourself if you do not need them)",
    )


def replaceable(directory: str) -> set[str]:
    """The names to delete from an existing step directory that a save of the same step replaces;
    :class:`OSError` if it holds anything tensorkeep did not write (then it is not replaced)."""
    if not os.path.lexists(directory):
        return set()
    if not _io.is_real_dir(directory):
        raise SaveError(errno.EEXIST, f"{directory} exists and is not a directory (a symlink?): not replaced")
    if not _io.is_regular_file(os.path.join(directory, MANIFEST)):
        raise SaveError(
            errno.EEXIST,
            f"{directory} exists and is not a checkpoint (it has no {MANIFEST}), so "
            "tensorkeep does not replace it. Fix: move it away (or delete it if you do not need it)",
        )
    ours, foreign = own_names(directory)
    if foreign:
        raise foreign_error(directory, foreign, "replaced")
    return ours


def leftovers(run: str, naming: Naming = DEFAULT) -> list[str]:
    """Temporary directories of unfinished saves (and of interrupted deletions) in ``run``: only
    tensorkeep's own temporary names of checkpoints, real directories, never symlinks."""
    try:
        names = os.listdir(run)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        base = (_io.temp_of(n) or ("",))[0]
        if base.endswith(_io.REPLACED):
            base = base[: -len(_io.REPLACED)]
        if naming.number(base) is not None and _io.is_real_dir(os.path.join(run, n)):
            out.append(os.path.join(run, n))
    return sorted(out)


def strangers(run: str, naming: Naming = DEFAULT) -> list[str]:
    """Entries named like checkpoints that are not (a symlink, or a directory with no manifest):
    tensorkeep neither reads nor deletes them, it only says so."""
    try:
        names = os.listdir(run)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        p = os.path.join(run, n)
        if naming.number(n) is not None and not (_io.is_real_dir(p) and _io.is_regular_file(os.path.join(p, MANIFEST))):
            out.append(p)
    return sorted(out)


def is_staged(directory: str) -> bool:
    """Whether a temporary directory holds the marker :mod:`~tensorkeep.checkpoint.stage` writes first
    into every directory it makes: then all of it is tensorkeep's (what other code wrote into it too)."""
    p = os.path.join(directory, STAGING_MARKER)
    if not _io.is_regular_file(p):
        return False
    try:
        with open(p, "rb") as f:
            raw = f.read(4096)
        return b'"' + STAGING_FORMAT.encode() + b'"' in raw and json.loads(raw).get("format") == STAGING_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def remove_leftover(p: str) -> list[str]:
    """Remove a temporary directory of an unfinished save: whole if it is staged (:func:`is_staged`),
    else tensorkeep's own names in it (those its manifest lists, ``*.tk``, temporary names). Returns
    what it kept."""
    if is_staged(p):
        _io.rmtree(p)
        return []
    try:
        listed = set(read_manifest(p).files)
    except FormatError:
        listed = set()
    names = {n for n in os.listdir(p) if n in listed or _OWN_FILE_RE.match(n) or _io.temp_of(n)}
    return _io.remove_own_dir(p, names)


def _put_back(run: str, parked: str, name: str, naming: Naming = DEFAULT) -> bool:
    """A committed step that a re-save of it had moved aside (no RENAME_EXCHANGE, see
    ``_io.replace_dir``) when the process died: renamed back if its name is free and it is whole."""
    final = os.path.join(run, name)
    if os.path.lexists(final) or naming.step_of(name) is None:
        return False
    try:
        check_files(parked, read_manifest(parked))
    except FormatError:
        return False
    warnings.warn(f"putting back {final}: a save of the same step died while replacing it", stacklevel=4)
    _io.rename(parked, final)
    _io.fsync_dir(run)
    return True


def clean_run(run: str, naming: Naming = DEFAULT) -> list[str]:
    """What a writer of ``run`` does when it opens it: remove tensorkeep's own leftovers (temporary
    directories of crashed saves or interrupted deletions, stale temporary files, unreferenced packs)
    and warn about — never delete — anything else named like a checkpoint. Returns what it removed."""
    removed = []
    for p in leftovers(run, naming):
        base = (_io.temp_of(os.path.basename(p)) or ("",))[0]
        if base.endswith(_io.REPLACED) and _put_back(run, p, base[: -len(_io.REPLACED)], naming):
            continue
        warnings.warn(f"removing the leftovers of an unfinished save: {p}", stacklevel=3)
        left = remove_leftover(p)
        if left:
            warnings.warn(f"{p}: kept {left}, which tensorkeep did not write", stacklevel=3)
        removed.append(p)
    for n in os.listdir(run):  # a killed tk.save(..., run/extra.tk) leaves a temporary file
        if _io.is_stale_temp(n, run) and _io.is_regular_file(os.path.join(run, n)):
            _io.unlink(os.path.join(run, n))
            removed.append(os.path.join(run, n))
    for p in strangers(run, naming):
        why = (
            "a symbolic link"
            if os.path.islink(p)
            else "not a directory"
            if not os.path.isdir(p)
            else "without a manifest"
        )
        warnings.warn(
            f"{p} is named like a checkpoint but is {why}: tensorkeep ignores it and never deletes it", stacklevel=3
        )
    return removed


def remove_checkpoint(run: str, step: int, durable: bool = True, naming: Naming = DEFAULT) -> bool:
    """Delete a checkpoint; False (with a warning, nothing deleted) if it holds what tensorkeep did not write.

    It is first renamed to a temporary name (a crash from then on leaves a recognizable leftover,
    removed when the run is next opened, never a checkpoint with missing files), then its own
    files are deleted by name."""
    d = step_dir(run, step, naming)
    if not _io.is_real_dir(d):
        warnings.warn(f"{d} is not a directory of this run (a symlink?): not deleted", stacklevel=3)
        return False
    ours, foreign = own_names(d)
    if foreign:
        warnings.warn(
            f"checkpoint step {step} was not deleted by retention: {foreign_error(d, foreign, 'deleted')}", stacklevel=3
        )
        return False
    doomed = _io.tmp_path(d)
    _io.rename(d, doomed)
    if durable:
        _io.fsync_dir(run)
    left = _io.remove_own_dir(doomed, ours)
    if left:  # something appeared meanwhile: left for its owner, under the temporary name
        warnings.warn(f"{doomed}: kept {left}, which tensorkeep did not write", stacklevel=3)
    return True


def now() -> float:
    return time.time()
