"""The manifest that makes a checkpoint exist: what it holds, written sealed (its own CRC-32), read
strictly (every field checked; what a newer tensorkeep wrote is refused with the fix).

>>> m = Manifest(3, time=0.0, metrics={"loss": 0.5})
>>> parse_manifest(seal(m.to_json()), "x").metrics
{'loss': 0.5}
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tensorkeep.checkpoint.naming import plain_name
from tensorkeep.core.format import dumps, seal, unseal
from tensorkeep.errors import FormatError
from tensorkeep.storage import local as _io

MANIFEST = "manifest.json"
FORMAT = "tensorkeep-checkpoint"
VERSION = 1
VERSION_INCREMENTAL = 2  # tensors live in run/packs (see packs.py); version-1 readers must refuse it
VERSION_BUNDLED = 3  # every part in one file (CheckpointManager(one_file=True)); older readers must refuse it
BUNDLE_KIND = "bundle"  #: the kind of that one file: its top-level keys are the parts, listed in ``bundled``
PACK_RE = re.compile(r"^\d{8,}-[0-9a-f]{8}\.tk$")
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


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
    # one_file=True: part name (as a file name, "model.tk") -> {"key", "kind"}, all inside the one file
    # of kind BUNDLE_KIND, under its top-level key: the part name without ".tk"
    bundled: dict[str, dict[str, str]] = field(default_factory=dict)

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
        if self.bundled:
            d.update(version=VERSION_BUNDLED, bundled=self.bundled)
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
    if d.get("version") not in (VERSION, VERSION_INCREMENTAL, VERSION_BUNDLED) or type(d.get("version")) is not int:
        raise FormatError(
            f"{path}: manifest version {d.get('version')!r}; this tensorkeep reads versions "
            f"{VERSION} to {VERSION_BUNDLED}: upgrade tensorkeep"
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
    if d["version"] == VERSION_BUNDLED:
        m.bundled = _validate_bundled(d.get("bundled"), files, path)
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


def _validate_bundled(bundled: Any, files: dict[str, Any], where: str) -> dict[str, dict[str, str]]:
    """Shape checks of a one-file checkpoint's ``bundled`` (untrusted JSON): parts named like files,
    each with a str key and kind, and exactly one file of kind ``"bundle"`` that holds them."""
    holders = [n for n, info in files.items() if info.get("kind") == BUNDLE_KIND]
    good = (
        isinstance(bundled, dict)
        and bool(bundled)
        and len(holders) == 1
        and all(
            plain_name(name)
            and name.endswith(".tk")
            and isinstance(p, dict)
            and set(p) == {"key", "kind"}
            and all(isinstance(v, str) for v in p.values())
            for name, p in bundled.items()
        )
    )
    if not good:
        raise FormatError(
            f"{where}: bad 'bundled' entry (expected part names ending in .tk, each "
            '{"key": str, "kind": str}, and one file of kind "bundle")'
        )
    return bundled


def unbundle(m: Manifest, loaded: dict[str, Any], where: str) -> dict[str, Any]:
    """``loaded`` (by file name) with a one-file checkpoint's parts taken out of its one file, so that
    they are found by part name as in a checkpoint of several files; :class:`FormatError` if one is missing.

    >>> m = Manifest(1, 0.0, bundled={"model.tk": {"key": "model", "kind": "state_dict"}})
    >>> m.files = {"state.tk": {"size": 1, "crc32": "0", "key": "", "kind": "bundle"}}
    >>> unbundle(m, {"state.tk": {"model": {"w": 1}}}, "x")
    {'model.tk': {'w': 1}}
    """
    if not m.bundled:
        return loaded
    out = {n: v for n, v in loaded.items() if m.files.get(n, {}).get("kind") != BUNDLE_KIND}
    (holder,) = [n for n, info in m.files.items() if info.get("kind") == BUNDLE_KIND]
    parts = loaded.get(holder)
    for name in m.bundled:
        stem = name[: -len(".tk")]
        if not isinstance(parts, dict) or stem not in parts:
            raise FormatError(f"{where}: {holder} holds no part {stem!r}, which its {MANIFEST} lists")
        out[name] = parts[stem]
    return out


def readable(steps: Iterable[int], read: Callable[[int], Manifest]) -> dict[int, Manifest]:
    """The manifests ``read(step)`` gives for ``steps``, by step; a damaged one is left out
    (``restore()`` skips it with a warning)."""
    out = {}
    for s in steps:
        try:
            out[s] = read(s)
        except FormatError:
            pass
    return out


def write_manifest(directory: str, m: Manifest, durable: bool = True) -> None:
    with _io.atomic_file(
        os.path.join(directory, MANIFEST), durable=durable, in_place=True
    ) as fd:  # published with its directory
        _io.pwrite_all(fd, memoryview(seal(m.to_json())), 0)
