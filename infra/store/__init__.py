"""Storage: one ``Store`` protocol, a folder and a bucket implementation, one factory.

Why a factory keyed by the location string: the inbox and outbox are configured as plain
strings (``data/inbox`` or ``s3://assets/inbox``), so switching a deployment from a folder to a
bucket is one environment variable, and no caller ever constructs a store by hand.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from infra.logging import register_secret
from infra.settings import Settings
from infra.store.base import ObjectInfo, Store, StoreError, UnsafeKeyError
from infra.store.folder import FolderStore, check_key

__all__ = [
    "FolderStore",
    "ObjectInfo",
    "Store",
    "StoreError",
    "UnsafeKeyError",
    "check_key",
    "open_store",
    "s3_credentials",
]


def open_store(location: str, settings: Settings) -> Store:
    """The store for ``location``: ``s3://bucket/prefix`` is a bucket, anything else a folder.

    A folder is created when missing (it is ours). A bucket is not: a missing bucket usually
    means a typo or the wrong endpoint, and creating one silently would hide that, so this
    raises a StoreError that says how to create it.
    """
    if location.startswith("s3://"):
        return _open_bucket(location, settings)
    if location.startswith("file://"):
        location = unquote(urlsplit(location).path)
    root = Path(location).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create folder store {root}: {exc.strerror}") from exc
    return FolderStore(root)


def _open_bucket(location: str, settings: Settings) -> Store:
    """A BucketStore for ``s3://bucket/prefix`` after checking that the bucket exists."""
    # Imported here: the S3 client's imports cost 0.15-0.2 s in every flow process that
    # only ever touches folders.
    from infra.store.bucket import BucketStore, make_client

    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    if not bucket:
        raise StoreError(f"{location!r} names no bucket: expected s3://bucket/prefix")
    access_key, secret_key = s3_credentials(settings)
    client = make_client(
        settings.s3_endpoint,
        access_key,
        secret_key,
        secure=settings.s3_secure,
        region=settings.s3_region,
    )
    store = BucketStore(client, bucket, prefix)
    try:
        exists = client.bucket_exists(bucket)
    except ValueError as exc:
        raise StoreError(f"{location!r}: {exc}") from exc
    except Exception as exc:  # transport or S3 error: say where, never with credentials
        raise store._fail("bucket check", "", exc) from exc
    if not exists:
        raise StoreError(
            f"bucket {bucket!r} does not exist at {store.endpoint}; create it first, e.g. "
            f"`mc mb ALIAS/{bucket}` or `aws s3 mb s3://{bucket} --endpoint-url {store.endpoint}`"
        )
    return store


def s3_credentials(settings: Settings) -> tuple[str, str]:
    """(access key, secret key), from the first source that has both.

    Order: I2VFLOW_S3_ACCESS_KEY/SECRET_KEY, then AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, then
    MINIO_ROOT_USER/MINIO_ROOT_PASSWORD, then the Prefect Secret block named by
    I2VFLOW_S3_SECRET_BLOCK holding ``ACCESS:SECRET``. The block is loaded only when needed,
    because loading it talks to the Prefect API.
    """
    if settings.s3_access_key and settings.s3_secret_key:
        return settings.s3_access_key.get_secret_value(), settings.s3_secret_key.get_secret_value()
    for user_var, secret_var in (
        ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
        ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"),
    ):
        if os.environ.get(user_var) and os.environ.get(secret_var):
            return os.environ[user_var], os.environ[secret_var]
    if settings.s3_secret_block:
        return _credentials_from_block(settings.s3_secret_block)
    raise StoreError(
        "no S3 credentials: set I2VFLOW_S3_ACCESS_KEY and I2VFLOW_S3_SECRET_KEY, or "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or I2VFLOW_S3_SECRET_BLOCK"
    )


def _credentials_from_block(name: str) -> tuple[str, str]:
    """Split the ``ACCESS:SECRET`` string kept in a Prefect Secret block."""
    from prefect.blocks.system import Secret  # lazy: importing Prefect costs a second

    try:
        value = Secret.load(name).get()
    except Exception as exc:
        raise StoreError(f"cannot load Prefect Secret block {name!r}: {type(exc).__name__}") from exc
    access, sep, secret = str(value).partition(":")
    if not (sep and access and secret):
        raise StoreError(f"Prefect Secret block {name!r} must hold 'ACCESS:SECRET'")
    register_secret(access, secret)  # the block's values are in no environment variable
    return access, secret
