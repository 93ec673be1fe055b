"""What the tests in every folder share: where the helper scripts are, and the campaign sizes.

tests/conftest.py puts this folder on ``sys.path``, so a test anywhere under tests/ imports the
helpers (``import ranks``, ``import crashsim``, ``from support import script, sizes``) without
computing a path. ``sizes`` is filled from the command line by conftest.py (its option table)
before any test module is imported.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)

#: Campaign sizes (``sizes.kill_trials``, ``sizes.fuzz_examples``, ...), set by conftest.pytest_configure.
sizes = SimpleNamespace()


def script(name: str) -> str:
    """The path of a helper script in tests/, e.g. ``script("train_job.py")``, to run in a subprocess."""
    return os.path.join(TESTS_DIR, name)
