"""Look inside files without loading them whole: describe, diff, dtype totals (verify lives in verification)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tensorkeep.api import load
from tensorkeep.core.dtypes import byte_view
from tensorkeep.core.format import DTYPE_SIZES
from tensorkeep.core.record import check_tree
from tensorkeep.file.reader import open_reader
from tensorkeep.file.safeopen import SafeOpen
from tensorkeep.file.torchfile import is_zip, load_torch_file
from tensorkeep.verification import Problem, VerifyResult, tensor_files, verify

__all__ = [
    "Problem",
    "TensorDiff",
    "VerifyResult",
    "describe_file",
    "diff",
    "dtype_totals",
    "render_tree",
    "tensor_files",
    "total_bytes",
    "verify",
]


def _short(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def describe_file(path: str) -> dict[str, Any]:
    """A JSON-able description of one file: kind, tensors, metadata, structure.

    >>> import torch, tensorkeep as tk
    >>> tk.save({"w": torch.zeros(2, 3)}, "/tmp/tk-doc-describe.tk")
    >>> describe_file("/tmp/tk-doc-describe.tk")["tensors"][0]["shape"]
    [2, 3]
    """
    r = open_reader(path)
    try:
        if not r.torch_pickle:
            check_tree(r.record, path)  # every node, before render_tree walks them
        if r.torch_pickle:
            obj = load_torch_file(path, None, False)
            flat = obj if isinstance(obj, dict) else {"tensor": obj}
            tensors = [
                {
                    "name": k,
                    "dtype": str(v.dtype).removeprefix("torch."),
                    "shape": list(v.shape),
                    "bytes": v.numel() * v.element_size(),
                    "checksum": "zip crc32" if is_zip(path) else "none (legacy torch file)",
                }
                for k, v in flat.items()
                if isinstance(v, torch.Tensor)
            ]
            return {
                "path": path,
                "kind": "torch (weights-only)",
                "size": r.size,
                "tensors": tensors,
                "metadata": {},
                "structure": None,
            }
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


def total_bytes(paths: list[str]) -> int:
    n = 0
    for p in paths:
        if os.path.isdir(p):
            n += sum(os.path.getsize(f) for f in tensor_files(p))
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
        in_a, in_b = set(ka), set(kb)  # built once: a set per name made diff quadratic
        out = [TensorDiff(n, "removed") for n in ka if n not in in_b]
        out += [TensorDiff(n, "added") for n in kb if n not in in_a]
        for n in (n for n in ka if n in in_b):
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
            out.append(
                TensorDiff(
                    n,
                    "values",
                    max_abs=float(d.nan_to_num(float("inf")).max()),
                    max_rel=float(rel.nan_to_num(float("inf")).max()),
                )
            )
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
