"""Fixtures of the storage conformance suite: import paths, a loopback-only guard and one S3 server per module."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (HERE, os.path.dirname(HERE)):  # conformance.py here; s3server.py in tests/
    if _p not in sys.path:
        sys.path.insert(0, _p)
import support  # noqa: E402

pytest.register_assert_rewrite("conformance")  # its asserts explain themselves, as in a test module

BUCKET = "tk-conformance"


@pytest.fixture(scope="module", autouse=True)
def loopback_only() -> Iterator[None]:
    """Every socket these tests open connects to 127.0.0.1, or the test fails."""
    with support.loopback_only():
        yield


@pytest.fixture(scope="module")
def s3_server(loopback_only: None) -> Iterator[Any]:
    """moto's S3 server on 127.0.0.1 (behind s3server's cuttable proxy) with one bucket, for the whole module."""
    s3fs = pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    import fsspec

    from s3server import ENV, S3Server

    srv = S3Server()
    mp = pytest.MonkeyPatch()
    for k, v in ENV.items():
        mp.setenv(k, v)
    mp.setitem(fsspec.config.conf, "s3", srv.fsspec_config())
    mp.setattr(s3fs.S3FileSystem, "retries", 2)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield srv
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        mp.undo()
        srv.close()


@pytest.fixture(scope="module")
def s3_bucket(s3_server: Any) -> str:
    """A bucket on the module's S3 server; tests take fresh prefixes of it."""
    import fsspec

    fsspec.filesystem("s3").call_s3("create_bucket", Bucket=BUCKET)
    return BUCKET
