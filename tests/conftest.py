import os

import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=int(os.environ.get("TK_HYPOTHESIS_EXAMPLES", "100")), deadline=None)
settings.load_profile("ci")


@pytest.fixture
def tmp(tmp_path):
    """A temporary directory as a str."""
    return str(tmp_path)
