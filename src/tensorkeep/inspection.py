"""Look inside files without loading them whole: describe, verify (streaming, all cores), diff."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .dtypes import byte_view
from .errors import FormatError, TensorkeepError
from .files import SafeOpen, _Reader, _torch_file
from .format import DTYPE_SIZES, crc32


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


def _short(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def describe_file(path: str) -> dict[str, Any]:
    """A JSON-able description of one file: kind, tensors, metadata, structure.

    >>> import torch, tensorkeep as tk
    >>> tk.save({"w": torch.zeros(2, 3)}, "/tmp/tk-doc-describe.tk")
    >>> describe_file("/tmp/tk-doc-describe.tk")["tensors"][0]["shape"]
    [2, 3]
    """
    r = _Reader(path)
    try:
        if r.torch_pickle:
            obj = _torch_file(path, None, False)
            flat = obj if isinstance(obj, dict) else {"tensor": obj}
            tensors = [
                {"name": k, "dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape),
                 "bytes": v.numel() * v.element_size(), "checksum": "none (torch file)"}
                for k, v in flat.items() if isinstance(v, torch.Tensor)
            ]
            return {"path": path, "kind": "torch (weights-only)", "size": r.size, "tensors": tensors,
                    "metadata": {}, "structure": None}
        tensors = []
        for name, t in r.header.tensors.items():
            ck = f"crc32 x{len(r.crcs[name])}" if r.crcs is not None else "none"
            tensors.append({"name": name, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes, "checksum": ck})
        return {
            "path": path,
            "kind": "tensorkeep" if r.header.is_tensorkeep else "safetensors",
            "size": r.size,
            "tensors": tensors,
            "metadata": r.metadata,
            "structure": render_tree(r.tree, r.header.tensors) if r.tree is not None else None,
        }
    finally:
        r.close()


def render_tree(tree: Any, infos: dict, indent: str = "", limit: int = 200) -> str:
    """The saved structure as an indented outline, tensors shown as ``F32[256, 20]``."""
    lines: list[str] = []

    def leaf(n: Any) -> str | None:
        if n is None or isinstance(n, (bool, int, str)):
            return repr(n)
        tag = next(iter(n))
        if tag == "f":
            return n["f"]
        if tag in ("t", "n"):
            t = infos[n[tag]]
            kind = "ndarray " if tag == "n" else ("Parameter " if n.get("p") else "")
            return f"{kind}{t.dtype}{_short(t.shape)}"
        if tag == "S":
            return f"torch.Size({n['S']})"
        if tag == "dt":
            return f"torch.{n['dt']}"
        if tag == "dev":
            return f"device({n['dev']!r})"
        return None

    def walk(n: Any, pre: str, label: str) -> None:
        if len(lines) >= limit:
            return
        s = leaf(n)
        if s is not None:
            lines.append(f"{pre}{label}{s}")
            return
        tag = next(iter(n))
        items = n[tag]
        opener = {"d": "dict", "o": "OrderedDict", "l": "list", "u": "tuple"}[tag]
        lines.append(f"{pre}{label}{opener} ({len(items)})")
        for it in items:
            if tag in ("d", "o"):
                walk(it[1], pre + "  ", f"{it[0]!r}: ")
            else:
                walk(it, pre + "  ", "- ")
        if len(lines) >= limit:
            lines.append(f"{pre}  ...")

    walk(tree, indent, "")
    return "\n".join(lines[: limit + 1])


def _verify_file(path: str, threads: int, progress: Callable[[int], None] | None, res: VerifyResult) -> None:
    res.files.append(path)
    try:
        r = _Reader(path)
    except (FormatError, OSError) as e:
        res.problems.append(Problem(path, str(e)))
        return
    try:
        res.checked_files += 1
        if r.torch_pickle:
            try:
                _torch_file(path, None, False)
                res.notes.append(f"{path}: torch file, loads weights-only, carries no checksums")
            except TensorkeepError as e:
                res.problems.append(Problem(path, str(e)))
            return
        if r.crcs is None:
            res.notes.append(f"{path}: plain safetensors file: structure OK, no checksums to verify")
            return
        local = threading.local()
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
            got = crc32(memoryview(view))
            if progress:
                progress(n)
            if got != r.crcs[name][i]:
                return f"tensor {name!r} is damaged (block {i}: crc32 {got:08x}, stored {r.crcs[name][i]:08x})"
            return None

        with ThreadPoolExecutor(threads, thread_name_prefix="tk-verify") as pool:
            for msg in pool.map(check, tasks):
                if msg:
                    res.problems.append(Problem(path, msg))
        res.checked_bytes += r.size
    finally:
        r.close()


def verify(paths: list[str] | str, *, threads: int | None = None,
           progress: Callable[[int], None] | None = None) -> VerifyResult:
    """Check every checksum and the structure of files and directories, streaming.

    >>> import torch, tensorkeep as tk
    >>> tk.save(torch.ones(3), "/tmp/tk-doc-verify.tk")
    >>> verify("/tmp/tk-doc-verify.tk").ok
    True
    """
    res = VerifyResult()
    threads = threads or os.cpu_count() or 2
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            for f in sorted(_tensor_files(p)):
                _verify_file(f, threads, progress, res)
        elif not os.path.exists(p):
            res.problems.append(Problem(p, "no such file or directory"))
        else:
            _verify_file(p, threads, progress, res)
    return res


def _tensor_files(d: str) -> list[str]:
    out = []
    for root, _, files in os.walk(d):
        for f in files:
            if f.endswith((".json", ".lock")) or ".tk-tmp-" in f:
                continue
            out.append(os.path.join(root, f))
    return out


def total_bytes(paths: list[str]) -> int:
    n = 0
    for p in paths:
        if os.path.isdir(p):
            n += sum(os.path.getsize(f) for f in _tensor_files(p))
        elif os.path.exists(p):
            n += os.path.getsize(p)
    return n


@dataclass
class TensorDiff:
    name: str
    status: str  # "added", "removed", "shape", "dtype", "values", "equal"
    detail: str = ""
    max_abs: float = 0.0
    max_rel: float = 0.0


def _open_flat(path: str) -> tuple[Any, Callable[[], None]]:
    """Something with keys() / info-like shape+dtype / get() for a file; a dict for others."""
    if os.path.isdir(path):
        from . import load

        flat = load(path)
        return flat, lambda: None
    f = SafeOpen(path)
    return f, f.close


def _meta(src: Any, name: str) -> tuple[str, tuple[int, ...]]:
    if isinstance(src, SafeOpen) and src._all is None:
        t = src.info(name)
        return t.dtype, t.shape
    v = src[name] if not isinstance(src, SafeOpen) else src.get(name)
    v = torch.as_tensor(v)
    return str(v.dtype).removeprefix("torch."), tuple(v.shape)


def _get(src: Any, name: str) -> torch.Tensor:
    v = src.get(name) if isinstance(src, SafeOpen) else src[name]
    return torch.as_tensor(v)


def diff(a: str, b: str) -> list[TensorDiff]:
    """Compare two files (or sharded directories) tensor by tensor.

    >>> import torch, tensorkeep as tk
    >>> tk.save({"w": torch.zeros(2)}, "/tmp/tk-doc-a.tk"); tk.save({"w": torch.ones(2)}, "/tmp/tk-doc-b.tk")
    >>> [(d.name, d.status, d.max_abs) for d in diff("/tmp/tk-doc-a.tk", "/tmp/tk-doc-b.tk")]
    [('w', 'values', 1.0)]
    """
    sa, close_a = _open_flat(a)
    sb, close_b = _open_flat(b)
    try:
        ka, kb = list(sa.keys()), list(sb.keys())
        out = [TensorDiff(n, "removed") for n in ka if n not in set(kb)]
        out += [TensorDiff(n, "added") for n in kb if n not in set(ka)]
        for n in (n for n in ka if n in set(kb)):
            (da, sha), (db, shb) = _meta(sa, n), _meta(sb, n)
            if sha != shb:
                out.append(TensorDiff(n, "shape", f"{_short(sha)} -> {_short(shb)}"))
                continue
            if da != db:
                out.append(TensorDiff(n, "dtype", f"{da} -> {db}"))
                continue
            x, y = _get(sa, n), _get(sb, n)
            if x.numel() == 0 or _bytes_equal(x, y):
                out.append(TensorDiff(n, "equal"))
                continue
            xd, yd = _as_float(x), _as_float(y)
            d = (xd - yd).abs()
            d = torch.where(torch.isnan(xd) & torch.isnan(yd), torch.zeros_like(d), d)
            rel = d / yd.abs().clamp_min(torch.finfo(torch.float64).tiny)
            out.append(TensorDiff(n, "values", max_abs=float(d.nan_to_num(float("inf")).max()),
                                  max_rel=float(rel.nan_to_num(float("inf")).max())))
        return out
    finally:
        close_a()
        close_b()


def _bytes_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    return bool(torch.equal(byte_view(x.contiguous()), byte_view(y.contiguous())))


def _as_float(x: torch.Tensor) -> torch.Tensor:
    if x.is_complex():
        return torch.view_as_real(x).to(torch.float64)
    return x.to(torch.float64)


def dtype_totals(tensors: list[dict]) -> dict[str, tuple[int, int]]:
    """{dtype: (count, bytes)} for a description's tensor list."""
    out: dict[str, tuple[int, int]] = {}
    for t in tensors:
        c, b = out.get(t["dtype"], (0, 0))
        out[t["dtype"]] = (c + 1, b + t["bytes"])
    return out


KNOWN_DTYPES = tuple(DTYPE_SIZES)
