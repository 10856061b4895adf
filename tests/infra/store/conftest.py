"""Fixtures for the store tests: the same contract runs against a folder and a real bucket.

``s3_server`` and ``s3_bucket`` come from the ``tests.s3server`` plugin that the root conftest
loads (``pytest_plugins`` is allowed only there).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from minio import Minio

from infra.store import FolderStore, Store
from infra.store.bucket import BucketStore


@pytest.fixture(params=["folder", "bucket", "bucket-prefixed"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Each contract test runs on a folder, a bucket root, and a prefix inside a bucket."""
    if request.param == "folder":
        yield FolderStore(tmp_path / "root")
        return
    client, bucket = request.getfixturevalue("s3_bucket")
    prefix = "in/box" if request.param == "bucket-prefixed" else ""
    yield BucketStore(client, bucket, prefix)


@pytest.fixture
def bucket_store(s3_bucket: tuple[Minio, str]) -> BucketStore:
    """A BucketStore at the root of a fresh bucket."""
    client, bucket = s3_bucket
    return BucketStore(client, bucket)
