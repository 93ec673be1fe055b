"""Save a model's architecture safely: its class by import path and a JSON config, never code.

:func:`save_model` writes the class path, the config its constructor takes and the parameters;
:func:`load_model` imports the class only from modules the caller allows, builds it on the meta
device first to check the config against the stored tensors, then for real, and loads it strictly.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import platform
import threading
import types
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from tensorkeep._version import __version__
from tensorkeep.core.format import dumps, strict_json
from tensorkeep.errors import FormatError, MismatchError, UntrustedModelError
from tensorkeep.file.safeopen import SafeOpen
from tensorkeep.file.writer import write
from tensorkeep.layouts.sharded import ShardedOpen, save_sharded
from tensorkeep.model import MODEL_KEY, load_into, plan_load, source_of


def _class_path(model: nn.Module) -> str:
    cls = type(model)
    mod, qual = cls.__module__, cls.__qualname__
    if mod == "__main__" or "<locals>" in qual:
        where = "in __main__ (your script)" if mod == "__main__" else "inside a function"
        raise TypeError(
            f"cannot save the architecture of {qual}: the class is defined {where}, so it cannot be imported "
            "by path when loading. Move it into a module (e.g. myproject/models.py) and import it from there, "
            "or save only the parameters with tk.save(model.state_dict(), path)."
        )
    try:
        found = _find_class(importlib.import_module(mod), qual, [mod], "")
    except (FormatError, UntrustedModelError):
        found = None
    if found is not cls:
        raise TypeError(f"cannot save the architecture of {qual}: {mod}.{qual} does not import back to this class")
    return f"{mod}:{qual}"


def _find_class(module: Any, qual: str, allow: Sequence[str], where: str) -> type:
    """The class ``qual`` ("Net", "Outer.Inner") defined in ``module``, found step by step in each
    object's own ``vars()``: never a module (that would leave ``module``), never ``getattr``
    (a module's ``__getattr__`` may import code), and every class on the way from a module in ``allow``."""
    obj: Any = module
    path = module.__name__
    for part in qual.split("."):
        obj = vars(obj).get(part) if part.isidentifier() else None
        path += "." + part
        if isinstance(obj, types.ModuleType):
            raise UntrustedModelError(
                f"{where}{path} is a module, not a class defined in {module.__name__}: a class path may not "
                f"leave its module. Name the class by its own module, e.g. {obj.__name__}:ClassName, and allow that"
            )
        if not isinstance(obj, type):
            raise FormatError(
                f"{where}{module.__name__} has no class {qual!r} (no {part!r} in {path.rsplit('.', 1)[0]})"
            )
        if not _allowed(obj.__module__, allow):
            raise UntrustedModelError(
                f"{where}{path} is {obj.__module__}.{obj.__qualname__}, a class from {obj.__module__!r}, which is not "
                f"in allow={list(allow)}. If you trust it, pass allow=[..., {obj.__module__!r}]"
            )
    return obj


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__.split("+")[0], "python": platform.python_version(), "tensorkeep": __version__}


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    config: Mapping[str, Any] | None = None,
    max_shard_size: int | str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save a model's class (by import path), the JSON ``config`` its constructor takes, and its parameters.

    No code and no pickle: :func:`load_model` imports the class only from modules you allow.
    ``max_shard_size="2GB"`` writes a sharded directory instead of one file.

    >>> import torch, tensorkeep as tk
    >>> tk.save_model(torch.nn.Linear(20, 256), "/tmp/tk-doc-lin.model", config={"in_features": 20, "out_features": 256})
    >>> tk.load_model("/tmp/tk-doc-lin.model", allow=["torch.nn"]).out_features
    256
    """
    info: dict[str, Any] = {"class": _class_path(model), "config": dict(config or {}), "versions": _versions()}
    try:
        inspect.signature(type(model)).bind(**info["config"])
    except TypeError as e:
        raise TypeError(
            f"save_model: load_model will build {type(model).__qualname__}(**config), which would fail: {e}. "
            "Pass config={...} with the arguments the model was built with."
        ) from None
    except ValueError:  # no signature to check (some C types)
        pass
    try:
        text = dumps(info)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"save_model: config must be plain JSON (str, numbers, bool, None, lists, dicts): {e}"
        ) from None
    meta = {**dict(metadata or {}), MODEL_KEY: text}
    sd = model.state_dict()
    if max_shard_size is None:
        write(sd, os.fspath(path), meta, durable=True)
    else:
        save_sharded(sd, path, max_shard_size=max_shard_size, metadata=meta)


def _allowed(module: str, allow: Iterable[str]) -> bool:
    return any(module == a or module.startswith(a.rstrip(".") + ".") for a in allow)


def load_model(
    path: str | os.PathLike[str],
    *,
    allow: Sequence[str],
    train: bool = False,
    device: Any = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Rebuild a model saved with :func:`save_model`: import its class (only from ``allow``),
    construct it with the stored config, load the parameters strictly, and return it in
    ``eval()`` mode (``train=True`` to skip that). ``allow`` lists trusted modules or packages:
    ``allow=["myproject"]`` also allows ``myproject.models``; the class itself must be defined in an
    allowed module (a class re-exported from elsewhere, or a path through another module, is
    refused). The model is first built on the meta device and checked against the file's tensor
    names and shapes, so a config that does not match fails before any memory is allocated.
    A version difference only warns.

    >>> import torch, tensorkeep as tk
    >>> tk.save_model(torch.nn.Linear(2, 3), "/tmp/tk-doc-lm.model", config={"in_features": 2, "out_features": 3})
    >>> tk.load_model("/tmp/tk-doc-lm.model", allow=["torch.nn"]).training
    False
    """
    path = os.fspath(path)
    src = ShardedOpen(path) if os.path.isdir(path) else SafeOpen(path)
    try:
        text = src.metadata.get(MODEL_KEY)
        if text is None:
            raise FormatError(
                f"{path}: holds parameters only, no architecture (it was not written by tk.save_model). "
                "Build the model in code and call tk.load_into(model, path)."
            )
        info = strict_json(text, f"{path}: model info")
        cls_path = info.get("class") if isinstance(info, dict) else None
        config = info.get("config", {}) if isinstance(info, dict) else None
        if type(cls_path) is not str or ":" not in cls_path or not isinstance(config, dict):
            raise FormatError(f"{path}: model info must have a 'class' (module:QualName) and a 'config' object")
        module, qual = cls_path.split(":", 1)
        if isinstance(allow, str):
            allow = [allow]
        if not all(p.isidentifier() for p in module.split(".")):
            raise FormatError(f"{path}: model class {cls_path!r} must be module:QualName with a dotted module name")
        if not _allowed(module, allow):
            raise UntrustedModelError(
                f"{path} asks to build {module}.{qual}, but {module!r} is not in allow={list(allow)}. tensorkeep "
                f"imports code only from modules you trust: if you trust this file, pass allow=[{module!r}] "
                f"(or a parent package such as {module.split('.')[0]!r})."
            )
        _check_versions(path, info.get("versions"))
        try:
            mod = importlib.import_module(module)  # allowed: the user trusts its code
        except ImportError as e:
            raise FormatError(
                f"{path}: the model class is in {module}, which cannot be imported here ({e}); "
                "install the package that defines it"
            ) from None
        cls = _find_class(mod, qual, allow, f"{path}: ")
        if not issubclass(cls, nn.Module):
            raise FormatError(f"{path}: {module}.{qual} is not an nn.Module class")
        model = _build(cls, config, src, path)
        load_into(model, src, strict=True, dtype=dtype, atomic=False)  # on error the model is dropped
    finally:
        src.close()
    if device is not None:
        model.to(device)
    return model.train() if train else model.eval()


class _TooBig(Exception):
    """A constructor registered more modules and tensors than the file can account for."""


#: While building a model for :func:`load_model`, at most this many registrations of a submodule,
#: parameter or buffer per tensor in the file, plus the slack: enough for any real architecture
#: (a transformer layer registers ~1.5 per tensor), while a config asking for a million layers
#: is stopped after a few thousand instead of running for hours.
_REGISTRATIONS_PER_TENSOR, _REGISTRATIONS_SLACK = 8, 10_000


@contextlib.contextmanager
def _registrations_at_most(limit: int) -> Iterator[None]:
    """Raise :class:`_TooBig` in this thread once modules built in it register over ``limit`` things."""
    me, count = threading.get_ident(), [0]

    def hook(*_: Any) -> None:
        if threading.get_ident() == me:
            count[0] += 1
            if count[0] > limit:
                raise _TooBig

    from torch.nn.modules import module as m

    handles = [
        m.register_module_module_registration_hook(hook),
        m.register_module_parameter_registration_hook(hook),
        m.register_module_buffer_registration_hook(hook),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


_FILLS = frozenset(
    {
        "normal_",
        "uniform_",
        "random_",
        "exponential_",
        "geometric_",
        "log_normal_",
        "cauchy_",
        "bernoulli_",
        "fill_",
        "zero_",
        "copy_",
    }
)


class _NoMetaFills(TorchFunctionMode):
    """Initialisers and fills of meta tensors do nothing: a meta tensor has no values to fill, and on
    the meta device some fills (``normal_``) run Python decompositions that import torch._dynamo."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        t = args[0] if args else kwargs.get("tensor")
        if (
            isinstance(t, torch.Tensor)
            and t.is_meta
            and (getattr(func, "__module__", None) == "torch.nn.init" or getattr(func, "__name__", None) in _FILLS)
        ):
            return t
        return func(*args, **kwargs)


def _build(cls: type, config: dict, src: Any, path: str) -> nn.Module:
    """``cls(**config)``, built for real only once a copy on the meta device (no memory) has the
    file's tensor names, shapes and dtypes: a small file cannot make us allocate a huge model.
    Both builds may register only as many modules and tensors as the file's size accounts for."""
    name = f"{cls.__module__}.{cls.__qualname__}"
    try:
        inspect.signature(cls).bind(**config)
    except TypeError as e:
        raise FormatError(f"{path}: the stored config does not fit {name}: {e}") from None
    except ValueError:  # no signature to check (some C types)
        pass
    source = source_of(src)
    limit = _REGISTRATIONS_PER_TENSOR * len(source.keys()) + _REGISTRATIONS_SLACK
    too_big = MismatchError(
        f"cannot load {path}: {name}(**config) with its stored config builds more than {limit} modules and tensors, "
        f"far more than the file's {len(source.keys())} tensors: the config does not match the file's parameters"
    )
    probe: nn.Module | None = None
    try:
        with _registrations_at_most(limit), torch.device("meta"), _NoMetaFills():
            probe = cls(**config)
    except _TooBig:
        raise too_big from None
    except Exception:
        pass
    probed = probe is not None
    if probe is not None:
        try:
            plan_load(probe, source, None, None, strict=True)
        except MismatchError as e:
            raise MismatchError(
                f"{path}: {name}(**config) with the file's own config does not match the file's "
                f"tensors (was the model info edited?), so nothing was built.\n{e}"
            ) from None
        probe = None
    try:
        with _registrations_at_most(limit):
            return cls(**config)
    except _TooBig:
        raise too_big from None
    except Exception as e:
        if not probed:  # failed on the meta device too: the config does not build this class
            raise FormatError(f"{path}: {name}(**config) with the stored config failed: {type(e).__name__}: {e}") from e
        raise


def _check_versions(path: str, saved: Any) -> None:
    if not isinstance(saved, dict):
        return
    now = _versions()
    for k in ("torch", "python", "tensorkeep"):
        a, b = str(saved.get(k, "")), now[k]
        if a and a.split(".")[:2] != b.split(".")[:2]:
            warnings.warn(
                f"{path} was saved with {k} {a}; this is {k} {b}. It usually loads fine; "
                "if it does not, use the saved version.",
                stacklevel=3,
            )
