"""open_store: one location string picks the store; credentials come from the first source
that has them; a missing bucket is reported, never created."""

from __future__ import annotations

from pathlib import Path

import pytest
from minio import Minio

from infra.settings import Settings
from infra.store import FolderStore, Store, StoreError, open_store, s3_credentials
from infra.store.bucket import BucketStore
from tests.s3server import S3Server

CRED_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in CRED_VARS:
        monkeypatch.delenv(var, raising=False)


def settings_for(server: S3Server, **overrides: object) -> Settings:
    return Settings(**{**server.settings_kwargs(), **overrides})


def test_plain_path_is_a_folder_created_if_missing(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "new" / "inbox"), Settings())
    assert isinstance(store, FolderStore) and isinstance(store, Store)
    assert (tmp_path / "new" / "inbox").is_dir()
    store.write("a.png", b"x")
    assert (tmp_path / "new" / "inbox" / "a.png").read_bytes() == b"x"


def test_file_uri_is_a_folder(tmp_path: Path) -> None:
    target = tmp_path / "with space"
    store = open_store(target.as_uri(), Settings())
    assert isinstance(store, FolderStore)
    assert store.root == target.resolve()


def test_s3_location_is_a_bucket_with_prefix(s3_server: S3Server, s3_bucket) -> None:
    client, bucket = s3_bucket
    store = open_store(f"s3://{bucket}/assets/inbox/", settings_for(s3_server))
    assert isinstance(store, BucketStore) and isinstance(store, Store)
    store.write("shoes/red.png", b"png")
    assert client.get_object(bucket, "assets/inbox/shoes/red.png").read() == b"png"
    assert store.describe() == f"s3://{bucket}/assets/inbox/ at {s3_server.url}"


def test_s3_location_without_prefix(s3_server: S3Server, s3_bucket) -> None:
    _, bucket = s3_bucket
    store = open_store(f"s3://{bucket}", settings_for(s3_server))
    store.write("k", b"v")
    assert store.url("k") == f"s3://{bucket}/k"


def test_missing_bucket_is_an_error_that_says_how_to_create_it(s3_server: S3Server) -> None:
    settings = settings_for(s3_server)
    with pytest.raises(StoreError, match="does not exist") as caught:
        open_store("s3://never-made-bucket/inbox", settings)
    message = str(caught.value)
    assert "mc mb" in message and s3_server.endpoint in message
    assert s3_server.access_key not in message and s3_server.secret_key not in message
    client = Minio(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=False)
    assert not client.bucket_exists("never-made-bucket")


def test_invalid_bucket_name_is_a_store_error(s3_server: S3Server) -> None:
    with pytest.raises(StoreError):
        open_store("s3://No_Such/x", settings_for(s3_server))
    with pytest.raises(StoreError, match="no bucket"):
        open_store("s3:///x", settings_for(s3_server))


def test_unreachable_endpoint_is_a_store_error(s3_server: S3Server) -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = settings_for(s3_server, s3_endpoint=f"127.0.0.1:{port}")
    with pytest.raises(StoreError, match="Connection refused") as caught:
        open_store("s3://some-bucket/x", settings)
    assert s3_server.secret_key not in str(caught.value)


def test_env_credentials_when_settings_have_none(
    s3_server: S3Server, s3_bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, bucket = s3_bucket
    settings = settings_for(s3_server, s3_access_key=None, s3_secret_key=None)
    monkeypatch.setenv("MINIO_ROOT_USER", "minio-user")
    monkeypatch.setenv("MINIO_ROOT_PASSWORD", "minio-pass")
    assert s3_credentials(settings) == ("minio-user", "minio-pass")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "aws-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    assert s3_credentials(settings) == ("aws-id", "aws-secret")
    open_store(f"s3://{bucket}/p", settings).write("k", b"v")  # moto accepts any key pair


def test_settings_credentials_win_over_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "aws-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    assert s3_credentials(settings_for(s3_server)) == (s3_server.access_key, s3_server.secret_key)


def save_secret_block(name: str, value: str) -> None:
    """A real Prefect Secret block on the session's server, as an operator would save one."""
    from prefect.blocks.system import Secret

    Secret(value=value).save(name, overwrite=True)


def test_secret_block_is_the_last_resort_and_loaded_lazily(prefect_api: str, s3_server: S3Server, s3_bucket) -> None:
    _, bucket = s3_bucket
    # Settings hold keys: a block name that exists nowhere is never looked up (looking it up would fail).
    assert s3_credentials(settings_for(s3_server, s3_secret_block="never-saved")) == (
        s3_server.access_key, s3_server.secret_key)
    save_secret_block("s3-creds", "blockkey:block:secret")  # a secret may hold a colon itself
    settings = settings_for(s3_server, s3_access_key=None, s3_secret_key=None, s3_secret_block="s3-creds")
    assert s3_credentials(settings) == ("blockkey", "block:secret")
    open_store(f"s3://{bucket}/p", settings).write("k", b"v")  # the store opens with the block's keys


def test_bad_or_missing_secret_block(prefect_api: str, s3_server: S3Server) -> None:
    save_secret_block("no-colon", "justonestring")
    for name, match in [("no-colon", "ACCESS:SECRET"), ("absent", "cannot load")]:
        settings = settings_for(s3_server, s3_access_key=None, s3_secret_key=None, s3_secret_block=name)
        with pytest.raises(StoreError, match=match) as caught:
            s3_credentials(settings)
        assert "justonestring" not in str(caught.value)


def test_no_credentials_anywhere(s3_server: S3Server) -> None:
    settings = settings_for(s3_server, s3_access_key=None, s3_secret_key=None)
    with pytest.raises(StoreError, match="no S3 credentials"):
        open_store("s3://bucket/x", settings)
