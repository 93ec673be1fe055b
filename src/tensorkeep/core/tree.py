"""Nested Python structures <-> a typed JSON tree plus a flat list of named arrays.

A saved object is any nesting of dict / OrderedDict / list / tuple holding torch
tensors, NumPy arrays and plain values. The tree records every container type,
key type and plain value exactly, and refers to each array by its tensor name in
the file. Arrays that are the same view of the same memory (tied weights) get one
name, so they are written once and load back as one shared object.

Tree nodes (JSON): ``null``/``true``/``false``/int/str are themselves;
``{"f": repr}`` a float; ``{"d"|"o": [[key, node], ...]}`` a dict / OrderedDict
(``"m"``: its ``_metadata``); ``{"l"|"u": [...]}`` a list / tuple;
``{"t": name}`` a torch tensor (``"p"``: an ``nn.Parameter``, ``"g"``: requires_grad);
``{"n": name}`` a NumPy array (``"s"``: a NumPy scalar); ``{"S": [...]}`` a
``torch.Size``; ``{"dt": "float32"}`` a ``torch.dtype``; ``{"dev": "cpu"}`` a ``torch.device``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from tensorkeep import knobs
from tensorkeep.core.dtypes import torch_dtype_named
from tensorkeep.errors import FormatError, LimitError

_Parameter = torch.nn.Parameter
_MAX_INT64 = (1 << 63) - 1
_CHECK_AFTER = 100_000  # nodes flatten visits before it checks the whole structure's size (most never get there)
_MAX_DEVICE_TEXT = 64
_SUPPORTED = (
    "tensorkeep saves torch tensors, NumPy arrays, dict/OrderedDict (str or int keys), list, tuple, "
    "and str/int/float/bool/None"
)


def _path_str(path: tuple) -> str:
    return "obj" + "".join(f"[{k!r}]" for k in path)


def _view_key(x: Any) -> tuple:
    """Identity of a view: same memory, same layout -> same key."""
    if isinstance(x, torch.Tensor):  # data_ptr() and storage_offset() together pin the storage;
        # a conjugate or negative view (c.conj(), c.conj().imag) shares its base's memory, not its values
        return ("t", x.device, x.data_ptr(), x.storage_offset(), x.dtype, x.shape, x.stride(), x.is_conj(), x.is_neg())
    return ("n", x.__array_interface__["data"][0], x.dtype.str, x.shape, x.strides)


class _Flattener:
    def __init__(self, root: Any) -> None:
        self.root, self.nodes = root, 0
        self.leaves: list[tuple[str, Any]] = []
        self._names: set[str] = set()
        self._by_view: dict[tuple, str] = {}
        self._keepalive: list[Any] = []  # arrays whose addresses are in _by_view

    def _leaf(self, x: Any, path: tuple) -> str:
        key = _view_key(x)
        empty = (x.numel() if isinstance(x, torch.Tensor) else x.size) == 0
        if not empty and key in self._by_view:
            return self._by_view[key]
        base = ".".join(map(str, path)) or "tensor"
        try:
            base.encode("utf-8")
        except UnicodeEncodeError:
            base = base.encode("utf-8", "backslashreplace").decode()
        if base == "__metadata__":
            base = "__metadata__~"
        name, i = base, 1
        while name in self._names:
            i += 1
            name = f"{base}~{i}"
        self._names.add(name)
        self._by_view[key] = name
        self._keepalive.append(x)
        self.leaves.append((name, x))
        return name

    def node(self, x: Any, path: tuple, depth: int) -> Any:
        if depth > knobs.MAX_DEPTH:
            raise ValueError(
                f"cannot save {_path_str(path[:5])}...: nested more than {knobs.MAX_DEPTH} levels deep "
                "(is there a cycle, a container that holds itself?)"
            )
        self.nodes += 1
        if self.nodes == _CHECK_AFTER:  # a big structure, or a DAG of shared dicts 40 deep (2**40 paths to walk)
            check_nesting(self.root, "cannot save", saving=True)
        t = type(x)
        if x is None or t is bool or t is str:
            return x
        if t is int:
            return x
        if t is float:
            return {"f": repr(x)}
        if t is torch.Tensor or t is _Parameter or isinstance(x, torch.Tensor):
            if x.layout != torch.strided or x.is_quantized:
                raise TypeError(
                    f"cannot save {_path_str(path)}: {x.layout} / quantized tensors are not supported; "
                    "convert with .to_dense() / .dequantize() first"
                )
            if x.is_meta:
                raise TypeError(f"cannot save {_path_str(path)}: a tensor on the 'meta' device has no data")
            node: dict[str, Any] = {"t": self._leaf(x, path)}
            if t is _Parameter or (t is not torch.Tensor and isinstance(x, _Parameter)):
                node["p"] = True
            if x.requires_grad:
                node["g"] = True
            return node
        if isinstance(x, (np.ndarray, np.generic)):
            arr = np.asarray(x)
            if arr.dtype.hasobject or arr.dtype.kind not in "biufc":
                raise TypeError(f"cannot save {_path_str(path)}: NumPy dtype {arr.dtype} is not supported")
            if isinstance(x, np.generic):
                return {"n": self._leaf(arr, path), "s": True}
            return {"n": self._leaf(x, path)}
        if t is dict or t is OrderedDict:
            items = []
            for k, v in x.items():
                if type(k) is not str and type(k) is not int:
                    raise TypeError(
                        f"cannot save {_path_str(path)}: dict key {k!r} is a {type(k).__name__}; "
                        "keys must be str or int"
                    )
                items.append([k, self.node(v, path + (k,), depth + 1)])
            if t is dict:
                return {"d": items}
            out: dict[str, Any] = {"o": items}
            meta = getattr(x, "_metadata", None)
            if meta is not None:  # nn.Module.state_dict() version info, used by load_state_dict
                out["m"] = self.node(meta, path + ("_metadata",), depth + 1)
            return out
        if t is list or t is tuple:
            tag = "l" if t is list else "u"
            return {tag: [self.node(v, path + (i,), depth + 1) for i, v in enumerate(x)]}
        if t is torch.Size:
            if any(not 0 <= d <= _MAX_INT64 for d in x):
                raise ValueError(
                    f"cannot save {_path_str(path)}: torch.Size {list(x)} has a dimension outside "
                    f"0 .. 2**63-1, which loading refuses"
                )
            return {"S": list(x)}
        if t is torch.dtype:
            return {"dt": str(x).removeprefix("torch.")}
        if t is torch.device:
            return {"dev": str(x)}
        raise TypeError(
            f"cannot save {_path_str(path)}: a {t.__module__}.{t.__qualname__} is not supported; {_SUPPORTED}"
        )


def flatten(obj: Any) -> tuple[Any, list[tuple[str, Any]]]:
    """Split ``obj`` into its JSON tree and ``[(name, tensor_or_array), ...]``.

    >>> tree, leaves = flatten({"w": torch.zeros(2), "n": 3})
    >>> tree, [name for name, _ in leaves]
    ({'d': [['w', {'t': 'w'}], ['n', 3]]}, ['w'])
    """
    f = _Flattener(obj)
    tree = f.node(obj, (), 0)
    return tree, f.leaves


def _fail(where: str, msg: str) -> FormatError:
    return FormatError(f"{where}: stored structure is invalid: {msg}")


def unflatten(tree: Any, get: Callable[[str, str], Any] | None, where: str) -> Any:
    """Rebuild the object from its tree; ``get(name, kind)`` returns the array ('t' torch, 'n' numpy).

    Each name is fetched once, so arrays referenced twice come back as one object. ``get=None``
    only checks the tree (what a file's reader does when it opens it): tensors come back as None.

    >>> unflatten({"d": [["w", {"t": "w"}], ["s", {"S": [2, 3]}]]}, lambda name, kind: name, "f")
    {'w': 'w', 's': torch.Size([2, 3])}
    """
    cache: dict[tuple[str, str], Any] = {}  # (name, kind) -> the array
    aliases: dict[tuple[str, bool, bool], Any] = {}  # (name, is a Parameter, requires grad) -> a tensor sharing it

    def leaf(name: Any, kind: str) -> Any:
        if type(name) is not str:
            raise _fail(where, f"tensor reference {name!r} is not a string")
        if get is None:
            return None
        if (name, kind) not in cache:
            cache[(name, kind)] = get(name, kind)
        return cache[(name, kind)]

    def items(v: Any, depth: int) -> list:
        if type(v) is not list:
            raise _fail(where, "container items must be a list")
        out = []
        for kv in v:
            if type(kv) is not list or len(kv) != 2 or type(kv[0]) not in (str, int):
                raise _fail(where, "dict items must be [str-or-int key, value] pairs")
            out.append((kv[0], build(kv[1], depth + 1)))
        return out

    def build(n: Any, depth: int) -> Any:
        if depth > knobs.MAX_DEPTH:
            raise _fail(where, f"nested more than {knobs.MAX_DEPTH} levels deep")
        t = type(n)
        if n is None or t in (bool, int, str):
            return n
        if t is not dict or len(n) == 0:
            raise _fail(where, f"unexpected node {n!r:.60}")
        tag = next(iter(n))
        extra = set(n) - {tag, "p", "g", "s", "m"}
        if extra:
            raise _fail(where, f"unexpected fields {sorted(extra)}")
        v = n[tag]
        if tag == "f":
            if type(v) is not str:
                raise _fail(where, "a float must be stored as its repr string")
            try:
                return float(v)
            except ValueError:
                raise _fail(where, f"bad float {v!r:.40}") from None
        if tag == "t":
            x = leaf(v, "t")
            if x is None:
                return None
            p, g = bool(n.get("p")), bool(n.get("g")) and (x.is_floating_point() or x.is_complex())
            if not p and not g:
                return x
            # a new tensor object sharing x's storage, made once per (name, kind), so that setting
            # requires_grad on one reference does not leak into a plain (detached) alias of it
            if (v, p, g) not in aliases:
                aliases[(v, p, g)] = torch.nn.Parameter(x, requires_grad=g) if p else x.detach().requires_grad_(True)
            return aliases[(v, p, g)]
        if tag == "n":
            x = leaf(v, "n")
            return x[()] if n.get("s") and x is not None else x
        if tag in ("d", "o"):
            pairs = items(v, depth)
            out = dict(pairs) if tag == "d" else OrderedDict(pairs)
            if len(out) != len(pairs):
                raise _fail(where, "duplicate dict key")
            if "m" in n:
                out._metadata = build(n["m"], depth + 1)  # type: ignore[attr-defined]
            return out
        if tag in ("l", "u"):
            if type(v) is not list:
                raise _fail(where, "a list/tuple must be stored as a list")
            seq = [build(x, depth + 1) for x in v]
            return seq if tag == "l" else tuple(seq)
        if tag == "S":
            if type(v) is not list or any(type(d) is not int or not 0 <= d <= _MAX_INT64 for d in v):
                raise _fail(where, f"torch.Size must be a list of ints in 0 .. 2**63-1, found {v!r:.60}")
            return torch.Size(v)
        if tag == "dt":
            dt = torch_dtype_named(v)  # never getattr(torch, v): that can import torch submodules
            if dt is None:
                raise _fail(where, f"unknown torch dtype {v!r:.40}")
            return dt
        if tag == "dev":
            if type(v) is not str or len(v) > _MAX_DEVICE_TEXT:  # saved as str(device): "cpu", "cuda:1"
                raise _fail(where, f"a device must be stored as its name, found {v!r:.40}")
            try:
                return torch.device(v)
            except (RuntimeError, TypeError, ValueError, OverflowError):
                raise _fail(where, f"bad device {v!r:.40}") from None
        raise _fail(where, f"unknown node tag {tag!r:.20}")

    return build(tree, 0)


def leaf_kinds(tree: Any, where: str) -> dict[str, str]:
    """Map each tensor name the tree refers to onto its kind ('t' torch, 'n' NumPy)."""
    out: dict[str, str] = {}
    stack = [(tree, 0)]
    while stack:
        n, depth = stack.pop()
        if depth > knobs.MAX_DEPTH:
            raise _fail(where, f"nested more than {knobs.MAX_DEPTH} levels deep")
        if type(n) is dict:
            for tag, v in n.items():
                if tag in ("t", "n") and type(v) is str:
                    out[v] = tag
                elif tag in ("d", "o") and type(v) is list:
                    stack.extend((kv[1], depth + 1) for kv in v if type(kv) is list and len(kv) == 2)
                elif tag in ("l", "u") and type(v) is list:
                    stack.extend((x, depth + 1) for x in v)
                elif tag == "m":
                    stack.append((v, depth + 1))
    return out


_ATOMS = frozenset({int, float, str, bool, bytes, complex, type(None), torch.Tensor, _Parameter})


def _container(x: Any) -> bool:
    t = type(x)
    return t not in _ATOMS and (t in (dict, list, tuple) or isinstance(x, (Mapping, list, tuple, set, frozenset)))


def check_nesting(obj: Any, where: str, *, saving: bool = False) -> None:
    """Refuse an object (unpickled from a ``.pt`` file or a DCP value, a state dict to walk, or,
    with ``saving``, one to save: then a ``ValueError``) whose containers nest more than
    ``knobs.MAX_DEPTH`` levels, that holds more than ``knobs.MAX_JSON_VALUES`` values counting a
    shared container at each use (a few KB of pickle can share one dict 2**40 ways: every later walk
    would follow each path), or that holds itself. Each container is looked at once: no more work
    than the object's size, and no recursion.

    >>> check_nesting({"w": [1, 2]}, "f.pt")
    """
    fix = "both where the file is saved and where it is loaded" if saving else "to read it"
    too_deep = FormatError if not saving else ValueError
    done: dict[int, tuple[int, int]] = {}  # container id -> (values, counting shared parts at each use; levels)
    path: set[int] = set()  # containers whose parts are being looked at: meeting one again is a cycle
    stack: list[tuple[Any, int, list]] = [(obj, 0, [])]  # (x, its depth, []), or (x, -1, the containers in x)
    while stack:
        x, depth, kids = stack.pop()
        if depth < 0:  # x's parts are done: total them
            size, levels = 1 + len(x) * (2 if isinstance(x, Mapping) else 1) - len(kids), min(len(x), 1)
            for c in kids:
                size, levels = size + done[id(c)][0], max(levels, done[id(c)][1] + 1)
            path.discard(id(x))
            done[id(x)] = size, levels
            if size > knobs.MAX_JSON_VALUES:
                raise (LimitError if not saving else ValueError)(
                    f"{where}: holds more than {knobs.MAX_JSON_VALUES} values, counting a container each time it "
                    f"is used (is a dict or list shared that many ways?); raise tensorkeep.knobs.MAX_JSON_VALUES {fix}"
                )
            depth = levels
        elif not _container(x) or id(x) in done:
            continue
        elif id(x) in path:
            raise too_deep(
                f"{where}: nested more than {knobs.MAX_DEPTH} levels deep: a container holds itself (a cycle)"
            )
        else:
            path.add(id(x))
            kids = [c for c in ((v for kv in x.items() for v in kv) if isinstance(x, Mapping) else x) if _container(c)]
            stack.append((x, -1, kids))
            stack.extend((c, depth + 1, []) for c in kids if id(c) not in done)
        if depth > knobs.MAX_DEPTH:
            raise too_deep(
                f"{where}: nested more than {knobs.MAX_DEPTH} levels deep (dicts, lists, tuples inside "
                f"each other); raise tensorkeep.knobs.MAX_DEPTH {fix}"
            )
