"""Capture and restore every global random number generator, for bit-exact resume."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def capture() -> dict[str, Any]:
    """The states of Python's ``random``, NumPy's global RNG, torch on CPU and every CUDA device.

    >>> s = capture(); a = torch.rand(1); restore(s); torch.equal(a, torch.rand(1))
    True
    """
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        # the 625 words of the Mersenne Twister as one array, not a 625-element JSON list
        "python": (version, np.array(internal, dtype=np.uint32), gauss),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return state


def restore(state: dict[str, Any]) -> None:
    """Put back what :func:`capture` returned (as saved and loaded by tensorkeep)."""
    version, internal, gauss = state["python"]
    if isinstance(internal, np.ndarray):
        internal = internal.tolist()
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


@contextmanager
def keep_rng() -> Iterator[None]:
    """Run a block without moving any global RNG stream.

    Creating a ``DataLoader`` iterator draws a base seed (and, for a shuffling sampler
    without its own generator, a shuffle seed) from torch's global RNG. Wrap
    ``iter(loader)`` in ``with tk.keep_rng():`` in every run, interrupted or not, so a
    mid-epoch resume sees the same random stream as the run that was never stopped.
    """
    state = capture()
    try:
        yield
    finally:
        restore(state)
