"""A training state as checkpoint files, and back: what is saved from ``state``, what restore puts back.

``state`` is a dict such as ``{"model": net, "optimizer": opt, "epoch": 3}``: each object with
``state_dict()``/``load_state_dict()`` becomes its own file, plain values share ``values.tk``, and
the RNG states of every library go into ``rng.tk``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from tensorkeep.checkpoint import determinism, layout, rng
from tensorkeep.errors import FormatError
from tensorkeep.model import load_into

RNG_FILE = "rng.tk"
VALUES_FILE = "values.tk"
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}$")

Payload = dict[str, tuple[str, str, Any]]  #: file name -> (state key, kind, object to save)


def has_state(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _file_for(key: str, taken: set[str]) -> str:
    base = key if _SAFE_KEY.match(key) and key not in ("rng", "values", "manifest") else "obj"
    name, i = f"{base}.tk", 1
    while name in taken:
        i += 1
        name = f"{base}-{i}.tk"
    return name


def payload(state: Mapping[str, Any]) -> Payload:
    """The files of a checkpoint of ``state``: live tensors, no copies, no RNG stream moved.

    >>> sorted(payload({"model": torch.nn.Linear(2, 2), "epoch": 3}))
    ['model.tk', 'rng.tk', 'values.tk']
    """
    if not isinstance(state, Mapping):
        raise TypeError("state must be a dict such as {'model': net, 'optimizer': opt, 'epoch': 3}")
    out: Payload = {}
    values: dict[str, Any] = {}
    taken = {RNG_FILE, VALUES_FILE, layout.MANIFEST}
    rng_state = rng.capture()  # first: some state_dict() calls draw random numbers (a StatefulDataLoader
    try:  # without an iterator creates one, drawing a base seed); saving must not move any stream
        for key, obj in state.items():
            if type(key) is not str:
                raise TypeError(f"state keys must be str, got {key!r}")
            if has_state(obj):
                name = _file_for(key, taken)
                taken.add(name)
                out[name] = (key, "state_dict", obj.state_dict())
            else:
                values[key] = obj
    finally:
        rng.restore(rng_state)
    if values:
        out[VALUES_FILE] = ("", "values", values)
    out[RNG_FILE] = ("", "rng", rng_state)
    return out


BUNDLE_FILE = "state.tk"


def bundle(files: Payload) -> tuple[Payload, dict[str, dict[str, str]]]:
    """The parts of a checkpoint as one file (``CheckpointManager(one_file=True)``): ``state.tk``, whose
    top-level keys are the part names without ``.tk``, and the manifest's ``bundled`` entry for them.

    >>> files, bundled = bundle(payload({"model": torch.nn.Linear(2, 2)}))
    >>> list(files), sorted(files["state.tk"][2]), bundled["model.tk"]
    (['state.tk'], ['model', 'rng'], {'key': 'model', 'kind': 'state_dict'})
    """
    parts = {name[: -len(".tk")]: obj for name, (_, _, obj) in files.items()}
    bundled = {name: {"key": key, "kind": kind} for name, (key, kind, _) in files.items()}
    return {BUNDLE_FILE: ("", layout.BUNDLE_KIND, parts)}, bundled


def check_rng(m: layout.Manifest, loaded: dict[str, Any], where: str) -> None:
    """The checkpoint's RNG states can be set (tried, then undone): a FormatError now, before any
    object is touched, rather than a half-applied restore later."""
    entries = {**m.files, **m.parts, **m.bundled}
    saved = [loaded[n] for n, i in entries.items() if i.get("kind") == "rng" and n in loaded]
    if not saved:
        return
    now = rng.capture()
    try:
        rng.restore(saved[0])
    except Exception as e:
        raise FormatError(
            f"{where}: its random number generator states cannot be restored ({type(e).__name__}: {e})"
        ) from None
    finally:
        rng.restore(now)


def apply(state: Mapping[str, Any], m: layout.Manifest, loaded: dict[str, Any]) -> None:
    """Put a loaded (and verified) checkpoint back into ``state``: objects, values, RNG states last."""
    entries = {**m.files, **m.parts, **m.bundled}
    by_key = {info["key"]: name for name, info in entries.items() if info.get("kind") == "state_dict"}
    values: dict[str, Any] = next((loaded[n] for n, i in entries.items() if i.get("kind") == "values"), {})
    missing = [k for k, o in state.items() if (k not in by_key if has_state(o) else k not in values)]
    if missing:
        warnings.warn(
            f"checkpoint step {m.step} has nothing for {missing}; they keep their current values", stacklevel=4
        )
    for key, obj in state.items():
        if has_state(obj) and key in by_key:
            sd = loaded[by_key[key]]
            if isinstance(obj, torch.nn.Module):
                load_into(obj, sd, strict=True, atomic=False)  # sd is in memory and verified
            else:
                obj.load_state_dict(sd)
    if isinstance(state, dict):
        for key, v in values.items():
            cur = state.get(key)
            if (
                isinstance(cur, torch.Tensor)
                and isinstance(v, torch.Tensor)
                and cur.shape == v.shape
                and cur.dtype == v.dtype
            ):
                with torch.no_grad():
                    cur.copy_(v)
            elif key in state:
                state[key] = v
    diffs = determinism.differences(m.environment, determinism.capture(determinism.devices(state)))
    if diffs:
        warnings.warn(
            f"checkpoint step {m.step} was saved by a process that computes differently from this one: "
            f"{'; '.join(diffs)}. The state is restored exactly, but the resumed run may not stay "
            "bit-identical to an uninterrupted one: run it with the same settings (see "
            "tensorkeep.checkpoint.determinism.pin)",
            stacklevel=4,
        )
    rng_state = next((loaded[n] for n, i in entries.items() if i.get("kind") == "rng"), None)
    if rng_state is not None:
        rng.restore(rng_state)  # last: nothing above may consume randomness afterwards
