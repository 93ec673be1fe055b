"""What the tests in every folder share: where the helper scripts are, and the campaign sizes.

tests/conftest.py puts this folder on ``sys.path``, so a test anywhere under tests/ imports the
helpers (``import ranks``, ``import crashsim``, ``from support import script, sizes``) without
computing a path. ``sizes`` is filled from the command line by conftest.py (its option table)
before any test module is imported.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)

#: Every torch dtype safetensors knows (the float8 kinds this torch has), for round-trip tests.
TORCH_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.uint16,
    torch.int32,
    torch.uint32,
    torch.int64,
    torch.uint64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
] + [
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, n)
]

#: Campaign sizes (``sizes.kill_trials``, ``sizes.fuzz_examples``, ...), set by conftest.pytest_configure.
sizes = SimpleNamespace()


def script(name: str) -> str:
    """The path of a helper script in tests/, e.g. ``script("train_job.py")``, to run in a subprocess."""
    return os.path.join(TESTS_DIR, name)


def _check_loopback(address: object) -> None:
    if isinstance(address, tuple):
        host = address[0]
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            raise AssertionError(f"a test tried to reach {address}: only 127.0.0.1 is allowed")


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Every socket opened inside connects to 127.0.0.1, or the test fails (tests that start an S3 server)."""
    real, real_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self: socket.socket, address: Any) -> None:
        _check_loopback(address)
        return real(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        _check_loopback(address)
        return real_ex(self, address)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex = real, real_ex  # type: ignore[method-assign]
