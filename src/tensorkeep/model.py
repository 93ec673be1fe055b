"""Load a checkpoint straight into a model, explaining every mismatch (``tk.load_into``).

The architecture itself (class by import path + JSON config) is :mod:`tensorkeep.architecture`."""

from __future__ import annotations

import difflib
import fnmatch
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tensorkeep.core.dtypes import torch_dtype
from tensorkeep.core.tree import check_nesting
from tensorkeep.errors import MismatchError
from tensorkeep.file.safeopen import SafeOpen
from tensorkeep.layouts.sharded import ShardedOpen

MODEL_KEY = "tensorkeep.model"
#: Prefixes that wrappers add to every name: DataParallel/DDP, torch.compile, Lightning-style holders.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
_CHUNK_BYTES = 16 << 20

Rename = "Mapping[str, str] | Callable[[str], str | None] | None"


@dataclass
class LoadReport:
    """What :func:`load_into` did. ``print(report)`` gives a readable summary."""

    source: str
    model: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint: kept initial values
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (name, checkpoint shape, model shape)
    wrong_dtype: list[tuple[str, str, str]] = field(default_factory=list)  # (name, checkpoint, model): would lose data
    converted: list[tuple[str, str, str]] = field(default_factory=list)  # (name, from dtype, to dtype)
    skipped: list[str] = field(default_factory=list)  # in the checkpoint, left out by `include`
    kept: list[str] = field(default_factory=list)  # in the model, left out by `include`: initial values kept
    tied: list[str] = field(default_factory=list)  # not in the checkpoint, shares memory with a loaded tensor
    renamed: dict[str, str] = field(default_factory=dict)  # checkpoint name -> model name, where they differ

    @property
    def ok(self) -> bool:
        """True when every model tensor came from the checkpoint and nothing was left over."""
        return not (self.missing or self.unexpected or self.mismatched or self.wrong_dtype)

    def __str__(self) -> str:
        lines = [
            f"loaded {len(self.loaded)} tensors from {self.source} into {self.model}"
            + ("" if self.ok else " (partial)")
        ]

        def section(title: str, names: Sequence[str]) -> None:
            if names:
                shown = ", ".join(names[:12]) + (f", ... ({len(names) - 12} more)" if len(names) > 12 else "")
                lines.append(f"  {title} ({len(names)}): {shown}")

        section("from the checkpoint", self.loaded)
        if self.renamed:
            section("renamed", [f"{a} -> {b}" for a, b in self.renamed.items()])
        section("kept their initial values (not in the checkpoint)", self.missing)
        section("kept their initial values (left out by include)", self.kept)
        section("tied to a loaded tensor", self.tied)
        section(
            "not loaded: shape differs",
            [f"{n}: checkpoint {_shape(a)} vs model {_shape(b)}" for n, a, b in self.mismatched],
        )
        section(
            "not loaded: floating-point into integer",
            [f"{n}: checkpoint {a} vs model {b}" for n, a, b in self.wrong_dtype],
        )
        section("in the checkpoint but not in the model", self.unexpected)
        section("in the checkpoint, left out by include", self.skipped)
        section("converted", [f"{n}: {a} -> {b}" for n, a, b in self.converted])
        return "\n".join(lines)

    __repr__ = __str__


def _shape(s: Iterable[int]) -> str:
    s = tuple(s)
    return "(" + ", ".join(map(str, s)) + ("," if len(s) == 1 else "") + ")"


def _flat_tensors(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """Tensors of a (possibly nested) dict, named with dots as tk.save names them; other values dropped.

    Checked first like a file's structure (``tree.check_nesting``, errors name ``where``): a DAG
    of shared dicts or a list nested 100,000 deep is refused, not walked 2**40 times or recursed into.
    """
    check_nesting(obj, where)
    out: dict[str, torch.Tensor] = {}
    stack: list[tuple[str | None, Any]] = [(None, obj)]  # (name, value); name None: the top, never a tensor itself
    while stack:
        name, x = stack.pop()
        if name is not None and (
            isinstance(x, torch.Tensor) or (hasattr(x, "__array__") and not isinstance(x, (str, bytes)))
        ):
            out[name] = torch.as_tensor(x)
            continue
        if isinstance(x, Mapping):
            items: list[tuple[Any, Any]] = list(x.items())
        elif isinstance(x, (list, tuple)):
            items = list(enumerate(x))
        else:
            continue
        pre = "" if name is None else name + "."
        stack.extend((f"{pre}{k}", v) for k, v in reversed(items))  # reversed: popped in order
    return out


class _DictSource:
    """An in-memory state dict behind the same small interface as SafeOpen."""

    def __init__(self, sd: Mapping[str, Any], path: str = "<state dict>") -> None:
        self._sd = _flat_tensors(sd, path)
        self.path = path

    def keys(self) -> list[str]:
        return list(self._sd)

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self._sd[name]
        return t.dtype, tuple(t.shape)

    def copy_into(self, name: str, out: torch.Tensor) -> None:
        out.copy_(self._sd[name])

    def close(self) -> None:
        pass


class _FileSource:
    """A tensorkeep/safetensors file, a .pt file, or a sharded directory, read tensor by tensor."""

    def __init__(self, f: SafeOpen | ShardedOpen, owned: bool) -> None:
        self.f, self.owned, self.path = f, owned, f.path
        self._flat = f._all if isinstance(f, SafeOpen) and f._all is not None else None
        if self._flat is not None:  # a .pt file, already in memory (weights-only unpickling reads it whole)
            self._flat = _flat_tensors(self._flat, f.path)
        self.verify = True

    def keys(self) -> list[str]:
        return list(self._flat) if self._flat is not None else self.f.keys()

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        if self._flat is not None:
            return self._flat[name].dtype, tuple(self._flat[name].shape)
        t = self.f.info(name)
        return torch_dtype(t.dtype), t.shape

    def copy_into(self, name: str, out: torch.Tensor) -> None:
        """Fill ``out`` without holding more than one chunk of extra memory."""
        if self._flat is not None:
            out.copy_(self._flat[name])
            return
        dtype, shape = self.meta(name)
        if dtype == out.dtype and out.device.type == "cpu" and out.is_contiguous():
            self.f.read_into(
                name, out, verify=self.verify, atomic=False
            )  # straight into the model's memory (load_into keeps its own backup)
            return
        if not shape or shape[0] == 0:
            out.copy_(self.f.get(name, verify=self.verify))
            return
        row = max(1, out[0].numel() * out.element_size())
        step = max(1, _CHUNK_BYTES // row)
        view = self.f.get_slice(name)
        for a in range(0, shape[0], step):
            out[a : a + step].copy_(view[a : a + step])

    def close(self) -> None:
        if self.owned:
            self.f.close()


def source_of(source: Any) -> _DictSource | _FileSource:
    if isinstance(source, (SafeOpen, ShardedOpen)):
        return _FileSource(source, owned=False)
    if isinstance(source, Mapping):
        return _DictSource(source)
    if isinstance(source, (str, os.PathLike)):
        p = os.fspath(source)
        return _FileSource(ShardedOpen(p) if os.path.isdir(p) else SafeOpen(p), owned=True)
    raise TypeError(f"load_into: source must be a path, a state dict or a tk.open handle, not {type(source).__name__}")


def _renamer(rename: Any) -> Callable[[str], str | None]:
    if rename is None:
        return lambda n: n
    if callable(rename):
        return rename
    if isinstance(rename, Mapping):
        rules = sorted(rename.items(), key=lambda kv: -len(kv[0]))  # longest prefix wins

        def by_prefix(n: str) -> str | None:
            for old, new in rules:
                if n.startswith(old):
                    return None if new is None else new + n[len(old) :]
            return n

        return by_prefix
    raise TypeError(
        "rename must be a dict of prefix replacements ({'module.': ''}, a None value drops those names) "
        "or a function name -> name (None drops the name)"
    )


def _includer(include: Any) -> Callable[[str], bool]:
    if include is None:
        return lambda n: True
    if callable(include):
        return include
    pats = [include] if isinstance(include, str) else list(include)

    def match(n: str) -> bool:
        return any(n.startswith(p) or fnmatch.fnmatchcase(n, p) for p in pats)

    return match


def _prefix_hint(ckpt: list[str], model: list[str]) -> str | None:
    """If one prefix explains the difference between the names, the exact ``rename`` to pass."""
    cset, mset = set(ckpt), set(model)
    for p in WRAPPER_PREFIXES + tuple({n.split(".", 1)[0] + "." for n in ckpt if "." in n}):
        if ckpt and all(n.startswith(p) for n in ckpt) and {n[len(p) :] for n in ckpt} & mset:
            return f"every checkpoint name starts with {p!r}{_why(p)}: pass rename={{{p!r}: ''}}"
    for p in WRAPPER_PREFIXES:
        if model and all(n.startswith(p) for n in model) and {n[len(p) :] for n in model} & cset:
            return f"every model name starts with {p!r}{_why(p)} but the checkpoint's do not: pass rename={{'': {p!r}}}"
    tops = list(dict.fromkeys(n.split(".", 1)[0] for n in ckpt))
    for top in tops:  # a training checkpoint: {"model": ..., "optimizer": ..., "epoch": ...}
        if mset and mset <= {n[len(top) + 1 :] for n in ckpt if n.startswith(top + ".")}:
            others = [o + "." if any(n.startswith(o + ".") for n in ckpt) else o for o in tops if o != top]
            drop = "".join(f", {o!r}: None" for o in others)
            return (
                f"the model's tensors are under {top + '.'!r}; the checkpoint also holds "
                f"{', '.join(repr(o) for o in tops if o != top)} (a training checkpoint?): "
                f"pass rename={{{top + '.'!r}: ''{drop}}} to take only the model's part"
            )
    return None


def _dt(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _lossy(ckpt: torch.dtype, model: torch.dtype) -> bool:
    """Copying would silently drop the fraction (float into int) or the imaginary part."""
    return (ckpt.is_floating_point and not (model.is_floating_point or model.is_complex)) or (
        ckpt.is_complex and not model.is_complex
    )


def _why(p: str) -> str:
    return {
        "module.": " (saved from DataParallel/DistributedDataParallel)",
        "_orig_mod.": " (saved from a torch.compile'd model)",
    }.get(p, "")


def _mismatch_message(rep: LoadReport, hint: str | None) -> str:
    lines = [f"cannot load {rep.source} into {rep.model}: the checkpoint does not match the model."]
    if rep.mismatched:
        lines.append("  shapes differ:")
        lines += [f"    {n}: checkpoint {_shape(a)} vs model {_shape(b)}" for n, a, b in rep.mismatched]
    if rep.wrong_dtype:
        lines.append("  floating-point values would be truncated into integer tensors:")
        lines += [f"    {n}: checkpoint {a} vs model {b}" for n, a, b in rep.wrong_dtype]
        lines.append("    (if that is intended, convert them yourself in a state dict and pass that as the source)")
    if rep.missing:
        lines.append("  in the model but missing from the checkpoint:")
        for n in rep.missing[:20]:
            close = [u for u in rep.unexpected if u.endswith("." + n)][:1] or difflib.get_close_matches(
                n, rep.unexpected, n=1
            )
            lines.append(f"    {n}" + (f"  (did you mean {close[0]!r}?)" if close else ""))
        if len(rep.missing) > 20:
            lines.append(f"    ... and {len(rep.missing) - 20} more")
    if rep.unexpected:
        lines.append("  in the checkpoint but not in the model:")
        lines += [f"    {n}" for n in rep.unexpected[:20]]
        if len(rep.unexpected) > 20:
            lines.append(f"    ... and {len(rep.unexpected) - 20} more")
    if hint:
        lines.append(f"Fix: {hint}.")
    else:
        lines.append(
            "The model's architecture must match the one that was saved (same layers, same sizes): "
            "build the model exactly as it was when the checkpoint was written."
        )
    lines.append(
        "To load only what fits and keep the rest at initial values, pass strict=False; "
        "to take only some layers, pass include=[...] (and rename={...})."
    )
    return "\n".join(lines)


def _where(t: torch.Tensor) -> Any:
    """Where a tensor's memory starts, to tell tied tensors (a meta tensor has none: its storage and offset)."""
    if t.is_meta:
        return ("meta", t.untyped_storage()._cdata, t.storage_offset() * t.element_size())
    return t.data_ptr()


def plan_load(model: nn.Module, src: Any, rename: Any, include: Any, strict: bool) -> tuple[LoadReport, dict[str, str]]:
    """Match the checkpoint's names, shapes and dtypes to ``model``'s tensors (reading no data,
    touching nothing): the report so far and ``{model name: checkpoint name}`` to load.
    With ``strict``, any mismatch raises :class:`MismatchError`. ``model`` may be on the meta device."""
    rep = LoadReport(source=src.path, model=type(model).__name__)
    targets = model.state_dict(keep_vars=True)
    ren, inc = _renamer(rename), _includer(include)
    plan: dict[str, str] = {}  # model name -> checkpoint name
    seen: dict[str, str] = {}  # model name -> the checkpoint name renamed to it
    ckpt_names = src.keys()
    for cname in ckpt_names:
        mname = ren(cname)
        if mname is None:
            continue
        if not inc(mname):
            rep.skipped.append(cname)
            continue
        if mname in seen:
            raise ValueError(
                f"load_into({src.path}): rename maps both {seen[mname]!r} and {cname!r} to {mname!r}. "
                f"Drop the one you do not want, e.g. rename={{..., {cname!r}: None}} (a None value drops "
                "names with that prefix), or narrow the prefixes so each name has one source."
            )
        seen[mname] = cname
        if mname != cname:
            rep.renamed[cname] = mname
        if mname in targets:
            (cdtype, cshape), target = src.meta(cname), targets[mname]
            if cshape != tuple(target.shape):
                rep.mismatched.append((mname, cshape, tuple(target.shape)))
            elif _lossy(cdtype, target.dtype):
                rep.wrong_dtype.append((mname, _dt(cdtype), _dt(target.dtype)))
            else:
                plan[mname] = cname
        else:
            rep.unexpected.append(mname)
    loaded_at = {_where(targets[m]) for m in plan if targets[m].numel()}
    refused = {m for m, _, _ in rep.mismatched} | {m for m, _, _ in rep.wrong_dtype}
    for mname, t in targets.items():
        if mname in plan or mname in refused:
            continue
        if not inc(mname):
            rep.kept.append(mname)
            continue
        (rep.tied if t.numel() and _where(t) in loaded_at else rep.missing).append(mname)
    if strict and not rep.ok:
        hint = _prefix_hint([c for c in ckpt_names if inc(ren(c) or "")] or ckpt_names, list(targets))
        raise MismatchError(_mismatch_message(rep, hint))
    return rep, plan


def _storages(tensors: Iterable[Any]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor) and t.numel()}


class _Undo:
    """Puts a model back as it was if loading into it fails: the old values of each tensor
    overwritten in place, and whatever ``Module.to(dtype)`` replaced."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor written in place, its old values)
        self.modules: list[tuple[nn.Module, dict, dict]] = []
        self.params: list[tuple[nn.Parameter, torch.Tensor, Any, Any]] = []
        self.fresh: set[int] = set()  # storages made by to(dtype) in this call: nobody else has seen them

    def to(self, dtype: torch.dtype) -> None:
        """``model.to(dtype)``, keeping what it replaces (references, not copies) to put back."""
        self.modules = [(m, dict(m._parameters), dict(m._buffers)) for m in self.model.modules()]
        self.params = [(p, p.data, p.grad, None if p.grad is None else p.grad.data) for p in self.model.parameters()]
        before = _storages(t for _, ps, bs in self.modules for t in [*ps.values(), *bs.values()])
        before |= _storages(self.model.state_dict(keep_vars=True).values())
        self.model.to(dtype)  # converts floating-point parameters and buffers only
        self.fresh = _storages(self.model.state_dict(keep_vars=True).values()) - before

    def backup(self, t: torch.Tensor) -> None:
        """Keep ``t``'s values (in CPU memory) before it is overwritten."""
        if t.numel() and t.untyped_storage().data_ptr() not in self.fresh:
            self.saved.append((t, t.to("cpu", copy=True)))

    def undo(self) -> None:
        with torch.no_grad():
            for t, old in reversed(self.saved):  # reversed: tensors sharing memory end with the oldest values
                t.copy_(old)
        for m, ps, bs in self.modules:
            m._parameters.update(ps)
            m._buffers.update(bs)
        for p, data, grad, grad_data in self.params:
            p.data = data
            if grad is not None:
                grad.data = grad_data
            p.grad = grad


def load_into(
    model: nn.Module,
    source: Any,
    *,
    strict: bool = True,
    rename: Any = None,
    dtype: torch.dtype | None = None,
    include: Any = None,
    verify: bool = True,
    atomic: bool = True,
) -> LoadReport:
    """Copy a checkpoint's tensors straight into ``model``'s parameters and buffers.

    ``source`` is a path (tensorkeep, safetensors or .pt file, or a sharded directory), a state
    dict, or a ``tk.open`` handle. Files are read tensor by tensor into the model's own memory.
    ``rename`` maps checkpoint names to model names: a dict of prefix replacements
    (``{"module.": ""}``; a ``None`` value drops names with that prefix) or a function
    (returning ``None`` drops the name). ``include`` keeps only model names with these
    prefixes/globs (or a predicate); the model's other tensors keep their initial values.
    ``dtype`` converts the model's floating-point tensors, and those read into them, on the way
    in; integer tensors are left alone. ``verify=False`` skips the checksums.
    With ``strict=True`` any missing, unexpected or mis-shaped tensor raises
    :class:`MismatchError` before the model is touched. A ``.pt`` source is unpickled (weights
    only) as a whole; every other source is read tensor by tensor.
    After any error (a damaged file, an I/O error, an interrupt) the model is exactly as it was:
    the old values of what is overwritten are kept in CPU memory until the load succeeds, and a
    ``dtype`` conversion is undone. ``atomic=False`` keeps nothing (no extra memory; after an
    error the model may hold part of the checkpoint).

    >>> import torch, tensorkeep as tk
    >>> net = torch.nn.Linear(2, 3); tk.save(net.state_dict(), "/tmp/tk-doc-lin.tk")
    >>> print(tk.load_into(torch.nn.Linear(2, 3), "/tmp/tk-doc-lin.tk"))
    loaded 2 tensors from /tmp/tk-doc-lin.tk into Linear
      from the checkpoint (2): weight, bias
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"load_into: dtype must be a floating-point torch dtype such as torch.bfloat16, not {dtype!r} "
            "(integer tensors are never converted)"
        )
    src = source_of(source)
    if isinstance(src, _FileSource):
        src.verify = verify
    try:
        rep, plan = plan_load(model, src, rename, include, strict)
        undo = _Undo(model) if atomic else None
        try:
            if dtype is not None:
                undo.to(dtype) if undo else model.to(dtype)
            targets = model.state_dict(keep_vars=True)
            with torch.no_grad():
                for mname, cname in plan.items():
                    out = targets[mname].detach()
                    cdtype = src.meta(cname)[0]
                    if cdtype != out.dtype:
                        rep.converted.append((mname, _dt(cdtype), _dt(out.dtype)))
                    if undo:
                        undo.backup(out)
                    src.copy_into(cname, out)
                    rep.loaded.append(mname)
        except BaseException:
            if undo:
                undo.undo()
            raise
        return rep
    finally:
        src.close()
