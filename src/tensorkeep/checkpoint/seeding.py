"""Per-sample seeds for random augmentation in ``Dataset.__getitem__``: bit-exact resume with loader workers.

A ``DataLoader`` worker seeds torch, ``random`` and NumPy once, when it starts, from the
iterator's base seed, and its generators then move with every sample it fetches. No
checkpoint holds those states (torchdata's ``StatefulDataLoader`` saves the base seed, the
sampler's position and a dataset's own ``state_dict``, not the workers' generators): after a
mid-epoch resume the new workers start from their initial states and draw different
augmentations, and persistent workers, never reseeded between epochs, diverge at any resume.
Seeding each sample from ``(seed, epoch, index)`` makes its augmentation a function of what the
checkpoint does hold, whichever process fetches it, and whatever it fetched before.
"""

from __future__ import annotations

import hashlib
import operator
import random
from collections.abc import Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager

import numpy as np
import torch


def _ints(what: str, key: tuple) -> list[int]:
    try:
        return [operator.index(k) for k in key]
    except TypeError:
        raise TypeError(
            f"{what} takes integers (a base seed, an epoch, a sample's index), got {key!r}: "
            "pass ints (an index from the sampler, not a float or a tensor of floats)"
        ) from None


def sample_seed(*key: int) -> int:
    """A 64-bit seed from integers (a base seed, an epoch, a sample's index): the same on every
    machine and in every version, different for different keys.

    >>> sample_seed(0, 3, 17) == sample_seed(0, 3, 17) != sample_seed(0, 4, 17)
    True
    """
    parts = [str(k) for k in _ints("seeded()", key)]
    return int.from_bytes(hashlib.blake2b(",".join(parts).encode(), digest_size=8).digest(), "little")


@contextmanager
def seeded(*key: int) -> Iterator[int]:
    """Seed torch's CPU generator, ``random`` and NumPy's global generator from ``key`` for one
    block, and put their previous states back afterwards; yields the seed (for your own
    ``np.random.default_rng(seed)`` or ``torch.Generator().manual_seed(seed)``).

    The block's draws depend only on ``key``, not on what the process drew before, and the
    rest of the process draws as if the block had not run. It swaps the process's global
    generators (about 0.1 ms, mostly NumPy's state): not for threads that draw concurrently.
    CUDA generators are left alone (augmentation in a loader worker runs on the CPU).

    >>> with seeded(0, 1, 42): a = torch.rand(2), random.random(), np.random.rand()
    >>> with seeded(0, 1, 42): b = torch.rand(2), random.random(), np.random.rand()
    >>> torch.equal(a[0], b[0]) and a[1:] == b[1:]
    True
    """
    seed = sample_seed(*key)
    saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])  # all 64 bits (a plain int seed must fit 32)
    torch.default_generator.manual_seed(seed)
    try:
        yield seed
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.default_generator.set_state(saved[2])


class SampleRNG:
    """Seeds each sample's augmentation from ``(seed, epoch, index)``; the epoch reaches the
    loader's workers, persistent ones too (it lives in shared memory).

    Create it in the dataset's ``__init__`` (before the loader starts workers), wrap the random
    part of ``__getitem__`` in ``with self.rng(index):``, and call ``set_epoch`` before every
    ``iter(loader)`` in every run, interrupted or not::

        class Noisy(torch.utils.data.Dataset):
            def __init__(self, x):
                self.x, self.rng = x, tk.SampleRNG(seed=0)
            def __getitem__(self, i):
                with self.rng(i):
                    return self.x[i] + 0.1 * torch.randn_like(self.x[i])

        ds.rng.set_epoch(step // len(loader))
        with tk.keep_rng():
            it = iter(loader)

    >>> r = SampleRNG(seed=7); r.set_epoch(2)
    >>> with r(5) as s: s == sample_seed(7, 2, 5)
    True
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = _ints("SampleRNG(seed)", (seed,))[0]  # fixed: a worker's copy would not see a change
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # the workers' copy is this memory

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch the next samples are drawn for (in the main process, before ``iter(loader)``)."""
        (e,) = _ints("SampleRNG.set_epoch", (epoch,))
        if not -(2**63) <= e < 2**63:
            raise ValueError(f"SampleRNG.set_epoch: {e} does not fit 64 bits; pass the epoch number")
        self._epoch.fill_(e)

    def __call__(self, index: int) -> ContextManager[int]:
        """``seeded(seed, epoch, index)``: the block's draws depend only on these three numbers."""
        return seeded(self.seed, self.epoch, index)

    def __repr__(self) -> str:
        return f"SampleRNG(seed={self.seed}, epoch={self.epoch})"


__all__ = ["seeded", "sample_seed", "SampleRNG"]
