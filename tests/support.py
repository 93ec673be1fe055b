"""What the tests in every folder share: where the helper scripts are.

tests/conftest.py puts this folder on ``sys.path``, so a test anywhere under tests/ imports the
helpers (``import ranks``, ``import crashsim``, ``from support import script``) without computing
a path.
"""

from __future__ import annotations

import os

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)


def script(name: str) -> str:
    """The path of a helper script in tests/, e.g. ``script("train_job.py")``, to run in a subprocess."""
    return os.path.join(TESTS_DIR, name)
