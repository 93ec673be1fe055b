"""How a run directory looks on disk, and the manifest that makes a checkpoint exist.

    run/
      .tensorkeep.lock
      step_00001000/            a committed checkpoint: its manifest.json is written last
        model.tk  optimizer.tk  ...  rng.tk  manifest.json
      .step_00002000.tk-tmp-…/  a save in progress (or the leftovers of a crashed one)

A checkpoint is published by renaming its finished, fsynced temporary directory; a
directory without a valid manifest is not a checkpoint.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from .. import _io
from ..errors import FormatError
from ..format import dumps, stored_crc, strict_json

MANIFEST = "manifest.json"
FORMAT = "tensorkeep-checkpoint"
VERSION = 1
VERSION_INCREMENTAL = 2  # tensors live in run/packs (see packs.py); version-1 readers must refuse it
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_PACK_RE = re.compile(r"^\d{8,}-[0-9a-f]{8}\.tk$")
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


def step_dir(run: str, step: int) -> str:
    return os.path.join(run, f"step_{step:08d}")


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

    def to_json(self) -> str:
        metrics = {k: ({"$float": repr(v)} if isinstance(v, float) and not math.isfinite(v) else v)
                   for k, v in self.metrics.items()}  # JSON has no NaN/Infinity: a diverged loss is tagged
        d = {"format": FORMAT, "version": VERSION, "step": self.step, "time": self.time,
             "metrics": metrics, "files": self.files, "versions": self.versions}
        if self.parts:
            d.update(version=VERSION_INCREMENTAL, parts=self.parts, packs=self.packs,
                     bytes={"written": self.bytes_written, "held": self.bytes_held})
        return dumps(d)


def clean_metrics(metrics: "dict[str, Any] | None", step: int) -> dict[str, Any]:
    """Metrics as plain Python scalars (NumPy and one-element tensor values unwrapped).

    >>> import numpy as np; clean_metrics({"acc": np.float32(0.5), "loss": float("nan")}, 1)
    {'acc': 0.5, 'loss': nan}
    """
    out: dict[str, Any] = {}
    for k, v in (metrics or {}).items():
        if type(k) is not str:
            raise TypeError(f"checkpoint step {step}: metric names must be str, got {k!r}")
        if type(v) not in (str, bool, int, float) and callable(getattr(v, "item", None)):
            try:
                v = v.item()  # a NumPy scalar, a 0-d array, a one-element tensor
            except (ValueError, RuntimeError):
                pass
        if v is not None and not isinstance(v, (str, bool, numbers.Real)):
            raise TypeError(f"checkpoint step {step}: metric {k!r} must be a number or a string, got "
                            f"{type(v).__name__}; pass e.g. float(value)")
        out[k] = v if v is None or isinstance(v, (str, bool, int, float)) else float(v)
    return out


def _untag(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"$float"} and v["$float"] in ("nan", "inf", "-inf"):
        return float(v["$float"])
    return v


def read_manifest(directory: str) -> Manifest:
    """Read and validate a checkpoint's manifest; :class:`FormatError` if it is missing or bad."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, "rb") as f:
            raw = f.read(10_000_001)
    except FileNotFoundError:
        raise FormatError(f"{directory}: no {MANIFEST} (the save did not finish)") from None
    return parse_manifest(raw, path)


def parse_manifest(raw: bytes, path: str) -> Manifest:
    """Validate a manifest's bytes (``path`` names it in errors); :class:`FormatError` if bad."""
    if len(raw) > 10_000_000:
        raise FormatError(f"{path}: manifest larger than 10 MB")
    d = strict_json(raw, path)
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise FormatError(f"{path}: not a tensorkeep checkpoint manifest")
    if d.get("version") not in (VERSION, VERSION_INCREMENTAL):
        raise FormatError(f"{path}: manifest version {d.get('version')!r}; this tensorkeep reads versions "
                          f"{VERSION} and {VERSION_INCREMENTAL}: upgrade tensorkeep")
    step, files = d.get("step"), d.get("files")
    if type(step) is not int or step < 0 or not isinstance(files, dict) or not isinstance(d.get("metrics"), dict):
        raise FormatError(f"{path}: manifest needs an int step, a files object and a metrics object")
    for name, info in files.items():
        if "/" in name or name in (".", "..") or not isinstance(info, dict) or type(info.get("size")) is not int:
            raise FormatError(f"{path}: bad file entry {name!r}")
    metrics = {k: _untag(v) for k, v in d["metrics"].items()}
    m = Manifest(step, float(d.get("time", 0)), metrics, files, d.get("versions") or {})
    if d["version"] == VERSION_INCREMENTAL:
        m.parts, m.packs = d.get("parts"), d.get("packs")
        _validate_parts(m.parts, m.packs, path)
        b = d.get("bytes") if isinstance(d.get("bytes"), dict) else {}
        m.bytes_written, m.bytes_held = b.get("written"), b.get("held")
    return m


def _validate_parts(parts: Any, packs: Any, where: str) -> None:
    """Shape checks of a manifest's ``parts``/``packs`` (the JSON is untrusted)."""
    if not isinstance(parts, dict) or not isinstance(packs, dict):
        raise FormatError(f"{where}: 'parts' and 'packs' must be objects")
    for pack, info in packs.items():
        if not _PACK_RE.match(pack) or not isinstance(info, dict) or type(info.get("size")) is not int \
                or not isinstance(info.get("crc32"), str):
            raise FormatError(f"{where}: bad pack entry {pack!r}")
    for name, part in parts.items():
        refs = part.get("tensors") if isinstance(part, dict) else None
        good = isinstance(refs, dict) and isinstance(part.get("key"), str) and isinstance(part.get("kind"), str) and all(
            type(r) is list and len(r) == 2 and isinstance(r[0], str) and _HASH_RE.match(r[0]) and r[1] in packs
            for r in refs.values())
        if not good:
            raise FormatError(f"{where}: bad part entry {name!r} (each tensor must be [sha256, pack listed in 'packs'])")


def write_manifest(directory: str, m: Manifest, durable: bool = True) -> None:
    with _io.atomic_file(os.path.join(directory, MANIFEST), durable=durable, in_place=True) as fd:  # published with its directory
        _io.pwrite_all(fd, memoryview(m.to_json().encode()), 0)


def check_files(directory: str, m: Manifest) -> None:
    """Every file the manifest lists exists with its recorded size and header checksum (the cheap
    check: it reads a few bytes per file; ``tk.load`` verifies the data itself)."""
    for name, info in m.files.items():
        p = os.path.join(directory, name)
        try:
            size = os.path.getsize(p)
        except OSError:
            raise FormatError(f"{directory}: {name} is missing") from None
        if size != info["size"]:
            raise FormatError(f"{directory}: {name} is {size} bytes, the manifest says {info['size']} (truncated?)")
        want = info.get("crc32")
        if isinstance(want, str) and stored_crc(p) != want:
            raise FormatError(f"{directory}: {name} has header checksum {stored_crc(p)!r}, the manifest says "
                              f"{want!r}: it is not the file this checkpoint wrote (replaced or damaged)")



def list_steps(run: str) -> list[int]:
    """Steps of the directories that look committed (named step_N with a manifest), ascending."""
    try:
        names = os.listdir(run)
    except FileNotFoundError:
        return []
    steps = []
    for n in names:
        m = _STEP_RE.match(n)
        if m and os.path.isfile(os.path.join(run, n, MANIFEST)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def leftovers(run: str) -> list[str]:
    """Temporary directories of unfinished saves, and step directories without a manifest."""
    out = []
    try:
        names = os.listdir(run)
    except FileNotFoundError:
        return []
    for n in names:
        p = os.path.join(run, n)
        if _io.TMP_MARK in n:
            out.append(p)
        elif _STEP_RE.match(n) and not os.path.exists(os.path.join(p, MANIFEST)):
            out.append(p)
    return sorted(out)


def remove_checkpoint(run: str, step: int) -> None:
    """Delete a checkpoint: its manifest first (so a crash midway leaves a non-checkpoint), then the rest."""
    d = step_dir(run, step)
    _io.unlink_if_exists(os.path.join(d, MANIFEST))
    _io.fsync_dir(d)
    _io.rmtree(d)


def now() -> float:
    return time.time()
