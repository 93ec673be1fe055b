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
import os
import re
import time
import warnings
from collections.abc import Mapping
from typing import Any

from tensorkeep.checkpoint.manifest import (  # re-exported: the manifest is part of the layout
    BUNDLE_KIND as BUNDLE_KIND,
)
from tensorkeep.checkpoint.manifest import (
    FORMAT as FORMAT,
)
from tensorkeep.checkpoint.manifest import (
    MANIFEST as MANIFEST,
)
from tensorkeep.checkpoint.manifest import (
    PACK_RE as PACK_RE,
)
from tensorkeep.checkpoint.manifest import (
    VERSION as VERSION,
)
from tensorkeep.checkpoint.manifest import (
    VERSION_INCREMENTAL as VERSION_INCREMENTAL,
)
from tensorkeep.checkpoint.manifest import (
    Manifest as Manifest,
)
from tensorkeep.checkpoint.manifest import (
    clean_metrics as clean_metrics,
)
from tensorkeep.checkpoint.manifest import (
    parse_manifest as parse_manifest,
)
from tensorkeep.checkpoint.manifest import (
    read_manifest as read_manifest,
)
from tensorkeep.checkpoint.manifest import (
    unbundle as unbundle,
)
from tensorkeep.checkpoint.manifest import (
    write_manifest as write_manifest,
)
from tensorkeep.checkpoint.naming import DEFAULT, Naming
from tensorkeep.checkpoint.naming import plain_name as plain_name
from tensorkeep.core.crc import crc32
from tensorkeep.errors import FormatError, SaveError
from tensorkeep.file import stored
from tensorkeep.storage import local as _io
from tensorkeep.storage.disk import DiskBackend

#: The manifest kind of a file tensorkeep did not encode (written by other code into a staged
#: checkpoint): its ``crc32`` is the CRC-32 of the whole file, checked by reading it all.
FILE_KIND = "file"
#: The first file of a staged checkpoint's temporary directory (see stage.py): proves it is ours.
STAGING_MARKER = ".tk-staging.json"
STAGING_FORMAT = "tensorkeep-staging"


def step_dir(run: str, step: int, naming: Naming = DEFAULT) -> str:
    return os.path.join(run, naming.name(step))


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
    else tensorkeep's own names in it (those its manifest lists, ``*.tk``, a torn staging marker, temporary names). Returns
    what it kept."""
    if is_staged(p):
        _io.rmtree(p)
        return []
    try:
        listed = set(read_manifest(p).files)
    except FormatError:
        listed = set()
    names = {n for n in os.listdir(p) if n in listed or n == STAGING_MARKER or _OWN_FILE_RE.match(n) or _io.temp_of(n)}
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
