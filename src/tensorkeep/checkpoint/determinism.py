"""What bit-exact determinism depends on: recorded with a checkpoint, compared when resuming.

Restoring a checkpoint exactly is not enough for a resumed run to end bit-identical to an
uninterrupted one: both must also compute the same way. Floating-point sums depend on their
order, and the order depends on how many threads split a reduction (torch's intra-op threads
follow the CPUs a process may use, so ``taskset`` or a container's CPU set changes results),
which kernels run (torch's CPU capability, the GPU model, cuDNN autotuning), the versions of
torch and NumPy, and the deterministic-algorithm flags. :func:`capture` records these as
plain JSON values; :func:`differences` says, line by line, what the current process does
differently from a recorded one; :func:`pin` and :data:`PINNED_ENV` fix the thread counts.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

# Read when a library starts (OpenMP, MKL, cuBLAS): set them in a child's environment, not later.
ENV_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OMP_DYNAMIC",
    "MKL_DYNAMIC",
    "MKL_CBWR",
    "ATEN_CPU_CAPABILITY",
    "CUBLAS_WORKSPACE_CONFIG",
)
PINNED_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OMP_DYNAMIC": "FALSE",
    "MKL_DYNAMIC": "FALSE",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}

_LABELS = {
    "torch": "torch version",
    "numpy": "NumPy version",
    "cpu_capability": "torch CPU kernels (ATen CPU capability)",
    "threads": "torch threads",
    "interop_threads": "torch inter-op threads",
    "deterministic": "torch.use_deterministic_algorithms",
    "deterministic_warn_only": "deterministic algorithms warn_only",
    "cudnn_deterministic": "torch.backends.cudnn.deterministic",
    "cudnn_benchmark": "torch.backends.cudnn.benchmark",
    "float32_matmul_precision": "float32 matmul precision",
    "cuda": "CUDA version",
    "cudnn": "cuDNN version",
    "gpus": "GPUs",
    "devices": "device types of the state",
}


@functools.cache
def _fixed() -> dict[str, Any]:
    """What cannot change within a process (computed once; the libraries read ENV_VARS as they start)."""
    return {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.version.cuda,
        "env": {k: os.environ.get(k) for k in ENV_VARS},
    }


@functools.cache
def _gpus() -> tuple[tuple[str, ...], int | None]:
    """GPU names and the cuDNN version; only asked once CUDA is initialized (never initializes it)."""
    names = tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return names, torch.backends.cudnn.version()


def capture(devices: Iterable[str] = ()) -> dict[str, Any]:
    """The settings a run's arithmetic depends on, as JSON values (a few microseconds).

    ``devices``: the device types of the state being saved (see :func:`devices`).

    >>> d = capture(["cpu"]); d["devices"], d["threads"] == torch.get_num_threads()
    (['cpu'], True)
    """
    d = dict(_fixed())  # the caller may change the copy, never the cache
    d["env"] = dict(d["env"])
    d.update(
        threads=torch.get_num_threads(),
        interop_threads=torch.get_num_interop_threads(),
        deterministic=torch.are_deterministic_algorithms_enabled(),
        deterministic_warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn_deterministic=bool(torch.backends.cudnn.deterministic),
        cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        devices=sorted(set(devices)),
    )
    if torch.cuda.is_initialized():
        names, d["cudnn"] = _gpus()
        d["gpus"] = list(names)
    return d


def devices(state: Mapping[str, Any]) -> list[str]:
    """The device types of the modules, optimizers and tensors in a training state.

    >>> devices({"model": torch.nn.Linear(2, 2), "epoch": 3})
    ['cpu']
    """
    found: set[str] = set()
    for obj in state.values():
        if isinstance(obj, torch.nn.Module):
            found.update(t.device.type for t in obj.parameters())
            found.update(t.device.type for t in obj.buffers())
        elif isinstance(obj, torch.optim.Optimizer):
            found.update(p.device.type for g in obj.param_groups for p in g["params"])
        elif isinstance(obj, torch.Tensor):
            found.add(obj.device.type)
    return sorted(found)


def differences(
    saved: Any, current: Mapping[str, Any] | None = None, words: tuple[str, str] = ("saved with", "now")
) -> list[str]:
    """What the current process does differently from ``saved`` (a :func:`capture`), one line each.

    ``saved`` comes from a manifest, untrusted JSON: anything missing is not compared, anything
    malformed is shown as it is, and nothing raises. ``current`` defaults to :func:`capture`;
    device types are compared only when both sides name some. ``words`` name the two sides.

    >>> differences({**capture(), "threads": 64})[0].startswith("torch threads: saved with 64, now ")
    True
    """
    if saved is None:
        return []  # a checkpoint from a tensorkeep that recorded nothing
    if not isinstance(saved, Mapping):
        return [f"the checkpoint's record of its settings is unreadable (a JSON {type(saved).__name__}, not an object)"]
    now = capture() if current is None else current
    out = []
    for key, label in _LABELS.items():
        if key not in saved or key not in now or (key == "devices" and not (saved[key] and now[key])):
            continue
        a, b = _plain(saved[key]), _plain(now[key])
        if a != b:
            out.append(f"{label}: {words[0]} {_show(a)}, {words[1]} {_show(b)}")
    env_saved, env_now = saved.get("env"), now.get("env")
    if isinstance(env_saved, Mapping) and isinstance(env_now, Mapping):
        for k in ENV_VARS:
            if k in env_saved and k in env_now:
                a, b = _plain(env_saved[k]), _plain(env_now[k])
                if a != b:
                    out.append(
                        f"environment variable {k}: {words[0]} {_show(a, 'unset')}, {words[1]} {_show(b, 'unset')}"
                    )
    return out


class _Malformed:
    """A value of a shape capture() never records; it differs from everything."""

    def __init__(self, v: Any) -> None:
        self.text = f"<{type(v).__name__}>"

    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = None  # type: ignore[assignment]


def _plain(v: Any) -> Any:
    """A comparable, printable form of a recorded value: a scalar, a tuple of scalars, or _Malformed."""
    if v is None or isinstance(v, (bool, str, float)) or (isinstance(v, int) and abs(v) < 10**18):
        return v
    if isinstance(v, (list, tuple)) and len(v) <= 64 and all(isinstance(x, str) for x in v):
        return tuple(v)
    return _Malformed(v)


def _show(v: Any, none: str = "none") -> str:
    if isinstance(v, _Malformed):
        return v.text
    if v is None:
        return none
    if isinstance(v, tuple):
        return "[" + ", ".join(_show(x) for x in v) + "]" if v else "[]"
    text = str(v)
    text = text if text.isprintable() and text.strip() == text and text else ascii(text)
    return text if len(text) <= 80 else text[:77] + "..."


def pin(threads: int = 1) -> None:
    """Fix this process's thread count and turn on deterministic algorithms.

    Child processes should also get :data:`PINNED_ENV` in their environment, so OpenMP and
    MKL start pinned (``subprocess.run(cmd, env={**os.environ, **PINNED_ENV})``).

    >>> pin(); torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    (1, True)
    """
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
