"""Verify files and directories against their own checksums and tables of contents, streaming on all cores.

A directory is told apart by its table of contents (a checkpoint step's ``manifest.json``, a model
directory's index, ``distributed.json``, DCP's ``.metadata``); what tensorkeep did not write is left out.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tensorkeep.checkpoint import layout, packs
from tensorkeep.core.format import TK_PREFIX, TensorInfo, crc32, looks_like_tensorkeep
from tensorkeep.core.record import check_tree
from tensorkeep.distributed.manifest import MANIFEST as dist_manifest
from tensorkeep.distributed.manifest import read_manifest as dist_read
from tensorkeep.errors import FormatError, TensorkeepError
from tensorkeep.file.reader import open_reader
from tensorkeep.file.torchfile import is_zip, load_torch_file
from tensorkeep.layouts import dcp, sharded
from tensorkeep.layouts.sharded import INDEX, SINGLE
from tensorkeep.storage import local as _io


@dataclass
class Problem:
    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}" if self.what.find(self.path) < 0 else self.what


@dataclass
class VerifyResult:
    """What :func:`verify` found: ``ok`` is True when nothing is damaged."""

    checked_files: int = 0
    checked_bytes: int = 0
    files: list[str] = field(default_factory=list)  # every file looked at
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. files that carry no checksums

    @property
    def ok(self) -> bool:
        return not self.problems


def _verify_file(
    path: str, threads: int, progress: Callable[[int], None] | None, res: VerifyResult
) -> dict[str, TensorInfo] | None:
    """Verify one file into ``res``; its tensors by name (None for a torch file or an unreadable header)."""
    res.files.append(path)
    try:
        r = open_reader(path, cached=False)  # the bytes on disk now, not a header parsed earlier
    except (ValueError, OSError) as e:  # FormatError is a ValueError; so is a path with a NUL
        res.problems.append(Problem(path, str(e)))
        return None
    try:
        if not r.torch_pickle:
            check_tree(r.record, path)  # every node of the structure: what a load would refuse
    except ValueError as e:
        r.close()
        res.problems.append(Problem(path, str(e)))
        return None
    try:
        res.checked_files += 1
        if r.torch_pickle:
            try:
                load_torch_file(path, None, False)  # a zip's CRC-32s are checked as it is read
                res.checked_bytes += r.size
                if not is_zip(path):
                    res.notes.append(f"{path}: legacy (non-zip) torch file, loads weights-only, carries no checksums")
            except TensorkeepError as e:
                res.problems.append(Problem(path, str(e)))
            return None
        if r.crcs is None:
            res.notes.append(f"{path}: plain safetensors file: structure OK, no checksums to verify")
            return dict(r.header.tensors)
        crcs, local = r.crcs, threading.local()
        tasks = []
        for name, t in r.header.tensors.items():
            for i, at in enumerate(range(0, max(t.nbytes, 1), r.block)):
                tasks.append((name, i, r.header.data_start + t.begin + at, min(r.block, t.nbytes - at)))

        def check(task: tuple) -> str | None:
            name, i, off, n = task
            buf = getattr(local, "buf", None)
            if buf is None or len(buf) < n:
                buf = local.buf = np.empty(max(n, 1), np.uint8)
            view = buf[:n]
            try:
                r.read_range(view, off)
            except FormatError as e:
                return str(e)
            got = crc32(view.data)
            if progress:
                progress(n)
            if got != crcs[name][i]:
                return f"tensor {name!r} is damaged (block {i}: crc32 {got:08x}, stored {crcs[name][i]:08x})"
            return None

        with ThreadPoolExecutor(threads, thread_name_prefix="tk-verify") as pool:
            for msg in pool.map(check, tasks):
                if msg:
                    res.problems.append(Problem(path, msg))
        res.checked_bytes += r.size
        return dict(r.header.tensors)
    finally:
        r.close()


def verify(
    paths: list[str] | str, *, threads: int | None = None, progress: Callable[[int], None] | None = None
) -> VerifyResult:
    """Check every checksum and the structure of files and directories, streaming.

    A directory is checked against its own table of contents: a checkpoint step against its
    ``manifest.json`` (and the run's packs), a run directory step by step, a model directory against
    ``model.safetensors.index.json``, a distributed checkpoint against ``distributed.json``, a
    torch DCP directory by reading it whole as :func:`~tensorkeep.convert_dcp` does. A file they name
    that is missing or is not a regular file (a dangling symlink, a directory, a FIFO), or a tensor
    file they do not name, is damage. Files that hold no tensors (``config.json``, ``README.md``)
    are ignored; a directory without any tensor file is OK with a note saying nothing was verified.

    >>> import torch, tensorkeep as tk
    >>> tk.save(torch.ones(3), "/tmp/tk-doc-verify.tk")
    >>> verify("/tmp/tk-doc-verify.tk").ok
    True
    """
    v = _Verifier(threads or os.cpu_count() or 2, progress)
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            seen = len(v.res.files) + len(v.res.problems)
            v.tree(p)
            if len(v.res.files) + len(v.res.problems) == seen:
                v.res.notes.append(f"{p}: no tensor files found (nothing verified)")
        elif not os.path.lexists(p):
            v.bad(p, "no such file or directory")
        elif v.regular(p):  # a FIFO would block the read forever; a dangling symlink is reported
            v.file(p)
    return v.res


_DATA_SUFFIXES = (".tk", ".safetensors", ".pt", ".pth", ".bin")
_SHARD_NAME = re.compile(r"^model(-\d{5,}-of-\d{5,})?\.safetensors$")  # what save_sharded and transformers write
_STEP_DIR = re.compile(r"^step_([0-9]+)$")
_RANK_FILE = re.compile(r"^rank-\d{5,}-of-\d{5,}\.tk$")
_DAMAGED_TOC = (ValueError, TypeError, OverflowError, OSError)  # what a damaged table of contents may raise
_DCP_META = ".metadata"


def _is_dcp(d: str, names: list[str]) -> bool:
    """A ``torch.distributed.checkpoint`` directory: ``.metadata`` next to ``.distcp`` files, or a
    ``.metadata`` that is DCP's pickle or no file at all (another program's ``.metadata`` folder is not)."""
    if _DCP_META not in names:
        return False
    if any(n.endswith(".distcp") for n in names):
        return True
    meta = os.path.join(d, _DCP_META)
    if os.path.isdir(meta):
        return False
    if not os.path.isfile(meta):
        return True  # a FIFO, a dangling symlink: reported as damage, never opened
    try:
        with open(meta, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return head[:1] == b"\x80" and b"torch.distributed.checkpoint" in head


def _ours(d: str, toc: str, named: re.Pattern, names: list[str]) -> bool:
    """Whether ``d/toc`` is tensorkeep's table of contents, intact or damaged, rather than another
    program's file of that name: a name in ``names`` is one tensorkeep gives, or the file holds its
    format marker, or it is not even valid JSON (damaged)."""
    if any(named.match(n) for n in names):
        return True
    try:
        with open(os.path.join(d, toc), "rb") as f:
            raw = f.read(1 << 20)
        json.loads(raw)
    except (OSError, ValueError, RecursionError):
        return True
    return b'"tensorkeep-' in raw


def _is_data(path: str) -> bool:
    """A regular file (symlinks followed) that holds tensors, by its name or its first bytes: not
    ``config.json``, ``README.md``, ``tokenizer.model``, a lock or a temporary file."""
    name = os.path.basename(path)
    if _io.TMP_MARK in name or name.endswith((".json", ".lock")) or not os.path.isfile(path):
        return False
    if name.endswith(_DATA_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(8 + len(TK_PREFIX))
    except OSError:
        return False
    n = int.from_bytes(head[:8].ljust(8, b"\0"), "little")
    return len(head) == 8 + len(TK_PREFIX) and (
        looks_like_tensorkeep(head) or (head[8:9] == b"{" and n <= os.path.getsize(path) - 8)
    )


class _Verifier:
    """Walks directories, verifying each against its table of contents; collects into ``res``."""

    def __init__(self, threads: int, progress: Callable[[int], None] | None) -> None:
        self.threads, self.progress, self.res = threads, progress, VerifyResult()
        self.packs: dict[str, dict[str, TensorInfo] | None] = {}  # pack path -> its tensors; each verified once

    def bad(self, path: str, what: str) -> None:
        self.res.problems.append(Problem(path, what))

    def file(self, path: str) -> dict[str, TensorInfo] | None:
        return _verify_file(path, self.threads, self.progress, self.res)

    def tree(self, top: str) -> None:
        stack = [top]  # not recursion: a directory tree may be deeper than Python's recursion limit
        while stack:
            d = stack.pop()
            try:
                names = sorted(os.listdir(d))
            except OSError as e:
                self.bad(d, f"{d}: cannot list the directory: {e}")
                continue
            up, base = os.path.split(os.path.abspath(d))
            if self.toc(d, names, layout.MANIFEST) and _ours(d, layout.MANIFEST, _STEP_DIR, [base]):
                rest = self.step(d, up, names)
            elif self.toc(d, names, dist_manifest) and _ours(d, dist_manifest, _RANK_FILE, names):
                rest = self.distributed(d, names)
            elif _is_dcp(d, names):
                rest = self.dcp(d, names)
            elif self.toc(d, names, INDEX) or SINGLE in names:
                rest = self.model_dir(d, names)
            else:
                rest = self.run(d, names)
            stack.extend(reversed([os.path.join(d, n) for n in rest if _io.is_real_dir(os.path.join(d, n))]))

    def toc(self, d: str, names: list[str], toc: str) -> bool:
        """Whether ``d`` holds ``toc`` as a regular file (opening a FIFO of that name would hang)."""
        return toc in names and self.regular(os.path.join(d, toc))

    def regular(self, path: str) -> bool:
        """Missing (reported by whoever checks it) or a regular file; anything else is reported here."""
        if os.path.islink(path) and not os.path.exists(path):
            self.bad(
                path,
                f"{path} is a symlink to {os.readlink(path)!r}, which does not exist (a download "
                "cache with a missing blob?): nothing can read it",
            )
            return False
        if os.path.lexists(path) and not os.path.isfile(path):
            self.bad(path, f"{path} is not a regular file (a directory, a FIFO, a device?)")
            return False
        return True

    def plain(self, d: str, names: list[str], toc: str | None = None) -> None:
        """Verify the tensor files among ``names``; with ``toc``, each is damage: a file it does not list."""
        for n in names:
            if n.endswith(_DATA_SUFFIXES) and os.path.islink(os.path.join(d, n)):
                self.regular(os.path.join(d, n))  # a dangling link named like tensors is damage
            if not _is_data(os.path.join(d, n)):
                continue
            if toc is None:
                self.file(os.path.join(d, n))
            else:
                self.bad(
                    os.path.join(d, n),
                    f"{d}: {n} holds tensors but {toc} does not list it: not part of "
                    f"what {toc} describes (added or left there by something else). Fix: move it out",
                )

    def listed(self, d: str, files: dict[str, dict], toc: str) -> dict[str, dict[str, TensorInfo] | None]:
        """Each file a manifest lists exists with its recorded size and header checksum; then verified
        (a file of kind ``"file"``, which tensorkeep did not encode, against its whole-file CRC-32)."""
        heads = {}
        for name, info in files.items():
            if not self.regular(os.path.join(d, name)):
                continue
            try:
                layout.check_files(d, layout.Manifest(0, 0.0, files={name: info}))
            except (ValueError, OSError) as e:
                self.bad(os.path.join(d, name), f"{e} ({toc})")
                continue
            if info.get("kind") == layout.FILE_KIND:  # another program's file: check_files read it whole
                self.res.files.append(os.path.join(d, name))
                self.res.checked_files += 1
                self.res.checked_bytes += info["size"]
                if self.progress:
                    self.progress(info["size"])
            elif not name.endswith(".json"):
                heads[name] = self.file(os.path.join(d, name))
        return heads

    def lacking(self, path: str, held: dict | None, want: list[str], toc: str) -> None:
        lost = [] if held is None else [n for n in want if n not in held]  # None: already reported
        if lost:
            shown = ", ".join(repr(n) for n in lost[:3]) + (f" and {len(lost) - 3} more" if len(lost) > 3 else "")
            self.bad(path, f"{path} lacks {len(lost)} tensor(s) that {toc} puts there: {shown}")

    def step(self, d: str, run: str, names: list[str]) -> list[str]:
        """A checkpoint against its manifest (and its packs in ``run``); returns the names left over."""
        try:
            m = layout.read_manifest(d)
        except _DAMAGED_TOC as e:
            self.bad(os.path.join(d, layout.MANIFEST), str(e))
            self.plain(d, names)
            return names
        num = _STEP_DIR.match(os.path.basename(os.path.abspath(d)))
        if num and int(num.group(1)) != m.step:
            self.bad(d, f"{d}: its {layout.MANIFEST} says step {m.step}: renamed or copied from another step")
        heads = self.listed(d, m.files, layout.MANIFEST)
        rest = [n for n in names if n not in m.files and n != layout.MANIFEST]
        self.plain(d, rest, layout.MANIFEST)
        for pack, info in m.packs.items():  # an incremental checkpoint's tensors are in the run's packs
            p = os.path.join(packs.packs_dir(run), pack)
            if not self.regular(p):
                continue
            try:
                packs.check_packs(run, {pack: info}, d)
            except (ValueError, OSError) as e:
                self.bad(p, str(e))
                continue
            if p not in self.packs:
                self.packs[p] = self.file(p)
        want: dict[str, list[str]] = {}
        for spec in m.parts.values():
            for h, pack in spec["tensors"].values():
                want.setdefault(os.path.join(packs.packs_dir(run), pack), []).append(h)
        for p, hashes in want.items():
            self.lacking(p, self.packs.get(p), hashes, os.path.join(d, layout.MANIFEST))
        if dist_manifest in m.files:  # saved by several ranks: also the layout of their files
            try:
                self.chunks(d, *dist_read(d), heads)
            except _DAMAGED_TOC as e:
                self.bad(os.path.join(d, dist_manifest), str(e))
        return rest

    def distributed(self, d: str, names: list[str]) -> list[str]:
        """A directory written by ``save_distributed``, against its ``distributed.json``."""
        try:
            man, stored = dist_read(d)
        except _DAMAGED_TOC as e:
            self.bad(os.path.join(d, dist_manifest), str(e))
            self.plain(d, names)
            return names
        heads = self.listed(d, man["files"], dist_manifest)
        rest = [n for n in names if n not in man["files"] and n != dist_manifest]
        self.plain(d, rest, dist_manifest)
        self.chunks(d, man, stored, heads)
        return rest

    def chunks(self, d: str, man: dict, stored: dict, heads: dict[str, dict[str, TensorInfo] | None]) -> None:
        """Each rank's file holds its chunk of every tensor, with the dtype and shape ``distributed.json`` says."""
        file_of = {info["rank"]: name for name, info in man["files"].items()}
        for key, st in stored.items():
            for c in st.chunks:
                held = heads.get(file_of[c.rank])
                t = None if held is None else held.get(key)
                if held is not None and (t is None or t.dtype != st.dtype or t.shape != c.sizes):
                    found = "nothing" if t is None else f"{t.dtype} {list(t.shape)}"
                    self.bad(
                        os.path.join(d, file_of[c.rank]),
                        f"{d}: {file_of[c.rank]} should hold {key!r} as "
                        f"{st.dtype} {list(c.sizes)} ({dist_manifest}), it holds {found}",
                    )

    def model_dir(self, d: str, names: list[str]) -> list[str]:
        """A model directory: the weights its readers use (``model.safetensors``, else the index and its
        shards); a file named like a shard that they do not use is damage; other tensor files are verified.
        A ``model.safetensors`` that is not a file (a dangling symlink, a directory) is damage too."""
        if SINGLE in names and not self.regular(os.path.join(d, SINGLE)):
            names = [n for n in names if n != SINGLE]  # reported
        try:
            where = sharded._read_index(d, check=False)  # missing shards: each reported below
        except _DAMAGED_TOC as e:
            if INDEX in names:  # (a damaged model.safetensors is reported by plain)
                self.bad(os.path.join(d, INDEX), str(e))
            self.plain(d, names)
            return names
        want: dict[str, list[str]] = {}
        for name, shard in where.items():
            want.setdefault(shard, []).append(name)
        for shard in sorted(want):
            if not os.path.lexists(shard):
                self.bad(shard, f"{os.path.join(d, INDEX)}: names {os.path.basename(shard)}, which is missing")
            elif self.regular(shard):
                self.lacking(shard, self.file(shard), want[shard], INDEX)
        rest = [n for n in names if os.path.join(d, n) not in want]
        toc = INDEX if os.path.join(d, SINGLE) not in want else f"{SINGLE} (which readers use instead of any index)"
        self.plain(d, [n for n in rest if _SHARD_NAME.match(n)], toc)
        self.plain(d, [n for n in rest if not _SHARD_NAME.match(n)])
        return rest

    def dcp(self, d: str, names: list[str]) -> list[str]:
        """A ``torch.distributed.checkpoint`` directory: read whole, with every check of :func:`convert_dcp`
        (chunks against the metadata, byte ranges against the files, the CRC-32s of ``torch.save`` blobs),
        into a temporary file that is then deleted. Raw (safetensors-format) chunks carry no checksum."""
        meta = os.path.join(d, _DCP_META)
        data = [os.path.join(d, n) for n in names if n.endswith(".distcp")]
        if not self.regular(meta):
            return names
        try:
            with tempfile.TemporaryDirectory(prefix="tk-verify-") as t:
                dcp.convert_dcp(d, os.path.join(t, "dcp.tk"))
        except ValueError as e:  # FormatError (and ChecksumError, LimitError) is a ValueError
            self.bad(d, f"damaged torch.distributed.checkpoint directory: {e}")
        except OSError as e:
            self.bad(d, f"{d}: this torch.distributed.checkpoint directory could not be verified: {e}")
        else:  # (a damaged directory is reported as a whole: the reader does not say which file is at fault)
            self.res.files += [meta, *data]
            self.res.checked_files += 1 + len(data)
            self.res.checked_bytes += sum(os.path.getsize(p) for p in [meta, *data] if os.path.isfile(p))
            self.res.notes.append(
                f"{d}: torch.distributed.checkpoint directory, read whole as convert_dcp reads it "
                "(its CRC-32s cover torch.save chunks; raw chunks carry none)"
            )
        self.plain(d, [n for n in names if n != _DCP_META and not n.endswith(".distcp")])
        return names

    def run(self, d: str, names: list[str]) -> list[str]:
        """A run directory (or any other): every checkpoint, what is named like one reported, files verified."""
        steps = [layout.step_dir(d, s) for s in layout.list_steps(d)]
        for s in steps:
            self.step(s, d, sorted(os.listdir(s)))
        strangers, temps = layout.strangers(d), layout.leftovers(d)
        staged = [os.path.join(d, n) for n in names if _io.temp_of(n) and layout.is_staged(os.path.join(d, n))]
        temps = sorted(set(temps) | set(staged))  # a staged save of any naming (checkpoint-N, checkpoint_N)
        for p in strangers:
            if _io.is_real_dir(p):
                self.bad(
                    p,
                    f"{p}: named like a checkpoint but has no {layout.MANIFEST}: not a checkpoint (a "
                    "save or a deletion was interrupted, or the manifest was lost); restore skips it",
                )
            else:
                self.res.notes.append(f"{p}: named like a checkpoint but is a symlink or a file: restore ignores it")
        self.res.notes += [f"{p}: an unfinished save (or one in progress): not verified" for p in temps]
        pd = packs.packs_dir(d)
        if steps and _io.is_real_dir(pd):
            self.res.notes += [
                f"{os.path.join(pd, n)}: no checkpoint refers to it (left by an interrupted save; the "
                "next save removes it): not verified"
                for n in sorted(os.listdir(pd))
                if os.path.join(pd, n) not in self.packs
            ]
        taken = {os.path.basename(p) for p in [*steps, *strangers, *temps, *([pd] if steps else [])]}
        rest = [n for n in names if n not in taken]
        self.plain(d, rest)
        return rest


def tensor_files(d: str) -> list[str]:
    """Every file under ``d`` that holds tensors (not in temporary directories)."""
    out = []
    for root, dirs, files in os.walk(d):
        dirs[:] = [x for x in dirs if _io.TMP_MARK not in x]
        out += [os.path.join(root, f) for f in files if _is_data(os.path.join(root, f))]
    return out
