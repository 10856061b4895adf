"""BucketStore specifics against a real S3 server over HTTP (moto): multipart, presigned URLs,
prefixes, outages, and credentials that must never reach a message."""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import structlog.testing
import urllib3
from minio import Minio

from infra.store import StoreError
from infra.store.bucket import BucketStore, make_client
from tests.s3server import S3Server, start_moto


def test_small_write_version_is_the_md5(bucket_store: BucketStore) -> None:
    bucket_store.write("a.txt", b"hello")
    assert bucket_store.stat("a.txt").version == hashlib.md5(b"hello").hexdigest()


def test_large_write_file_goes_multipart_and_reads_back(bucket_store: BucketStore, tmp_path: Path) -> None:
    data = os.urandom(20 * 1000 * 1000)
    src = tmp_path / "clip.mp4"
    src.write_bytes(data)
    bucket_store.write_file("out/clip.mp4", str(src), content_type="video/mp4")
    info = bucket_store.stat("out/clip.mp4")
    assert info.size == len(data)
    assert re.fullmatch(r"[0-9a-f]{32}-2", info.version), info.version  # 16 MiB + rest
    assert info.version != hashlib.md5(data).hexdigest()
    assert [i.version for i in bucket_store.list("out/")] == [info.version]
    assert bucket_store.read("out/clip.mp4") == data
    obj = bucket_store.client.stat_object(bucket_store.bucket, "out/clip.mp4")
    assert obj.content_type == "video/mp4"


def test_content_type_is_stored(bucket_store: BucketStore) -> None:
    bucket_store.write("spec.json", b"{}", content_type="application/json")
    obj = bucket_store.client.stat_object(bucket_store.bucket, "spec.json")
    assert obj.content_type == "application/json"


def test_prefix_maps_keys_and_hides_the_rest(s3_bucket: tuple[Minio, str]) -> None:
    client, bucket = s3_bucket
    client.put_object(bucket, "elsewhere/x", io.BytesIO(b"x"), 1)
    client.put_object(bucket, "in/boxer/y", io.BytesIO(b"y"), 1)
    store = BucketStore(client, bucket, "/in/box/")
    store.write("shoes/red.png", b"png")
    assert client.get_object(bucket, "in/box/shoes/red.png").read() == b"png"
    assert [i.key for i in store.list()] == ["shoes/red.png"]
    assert store.url("shoes/red.png") == f"s3://{bucket}/in/box/shoes/red.png"
    assert store.describe().startswith(f"s3://{bucket}/in/box/ at http://127.0.0.1:")


def test_directory_markers_and_unaddressable_names_are_not_listed(
    s3_bucket: tuple[Minio, str],
) -> None:
    client, bucket = s3_bucket
    client.put_object(bucket, "p/folder/", io.BytesIO(b""), 0)
    client.put_object(bucket, "p/a//b", io.BytesIO(b"x"), 1)  # minio refuses '..' itself
    client.put_object(bucket, "p/ok", io.BytesIO(b"x"), 1)
    with structlog.testing.capture_logs() as logs:
        assert [i.key for i in BucketStore(client, bucket, "p").list()] == ["ok"]
    # a console's folder marker is normal; an unaddressable name deserves a warning
    assert [(e["event"], e["object"]) for e in logs] == [("store.unsafe_key_skipped", "p/a//b")]


def test_presigned_url_fetches_the_bytes(bucket_store: BucketStore) -> None:
    key = "out/ünï cødé+1.mp4"
    bucket_store.write(key, b"video bytes")
    url = bucket_store.presigned_url(key, timedelta(minutes=5))
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"video bytes"
    assert "X-Amz-Expires=300" in url


def test_open_releases_the_connection_on_close(bucket_store: BucketStore, monkeypatch) -> None:
    released: list[object] = []
    real = urllib3.response.HTTPResponse.release_conn

    def spy(self) -> None:  # noqa: ANN001
        released.append(self)
        real(self)

    monkeypatch.setattr(urllib3.response.HTTPResponse, "release_conn", spy)
    bucket_store.write("s", b"x" * 100_000)
    stream = bucket_store.open("s")
    assert stream.read(5) == b"xxxxx"
    released.clear()
    stream.close()
    assert released, "close() must also release the pooled connection"


def test_missing_bucket_is_a_store_error_not_a_missing_object(s3_server: S3Server) -> None:
    store = BucketStore(s3_server.client(), "no-such-bucket-here")
    with pytest.raises(StoreError, match="NoSuchBucket"):
        store.read("x")
    with pytest.raises(StoreError, match="NoSuchBucket"):
        list(store.list())
    with pytest.raises(StoreError, match="NoSuchBucket"):
        store.write("x", b"x")


@pytest.fixture
def doomed_server() -> Iterator[tuple[S3Server, object]]:
    """A private moto server that the test may stop (the session one must stay up)."""
    server, info = start_moto()
    client = info.client()
    client.make_bucket("doomed")
    yield info, server
    server.stop()  # idempotent enough: stopping twice only joins a finished thread


def test_stopped_server_gives_store_error_quickly(doomed_server, tmp_path: Path) -> None:
    info, server = doomed_server
    store = BucketStore(info.client(), "doomed", "p")  # the pipeline's timeouts and retries
    store.write("k", b"v")
    server.stop()
    started = time.monotonic()
    with pytest.raises(StoreError, match="Connection refused"):
        store.stat("k")
    assert time.monotonic() - started < 15  # ~3 s of backoff, never minutes

    no_retry = make_client(info.endpoint, info.access_key, info.secret_key, retries=0)
    store = BucketStore(no_retry, "doomed", "p")
    src = tmp_path / "f"
    src.write_bytes(b"f")
    calls = [
        lambda: store.stat("k"),
        lambda: store.read("k"),
        lambda: store.open("k"),
        lambda: list(store.list()),
        lambda: store.write("k", b"v"),
        lambda: store.write_file("k", str(src)),
        lambda: store.delete("k"),
    ]
    for call in calls:
        with pytest.raises(StoreError) as caught:
            call()
        message = str(caught.value)
        assert "s3://doomed/p/" in message and "Connection refused" in message
        assert info.access_key not in message and info.secret_key not in message


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A TCP port that accepts connections and never answers: a hung server."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    sock.close()


def test_hung_server_times_out_into_store_error(silent_endpoint: str) -> None:
    client = make_client(silent_endpoint, "AKIDHUNG", "hung-secret", region="us-east-1", read_timeout=0.5, retries=1)
    store = BucketStore(client, "bucket")
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            store.stat("k")
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome.append(exc)

    worker = threading.Thread(target=call, daemon=True)  # a hang must fail, not stall the suite
    worker.start()
    worker.join(timeout=10)
    assert outcome, "stat() on a silent server did not return within 10 s"
    (error,) = outcome
    assert isinstance(error, StoreError) and "timed out" in str(error).lower(), error
    assert "hung-secret" not in str(error) and "AKIDHUNG" not in str(error)


def test_credentials_never_in_describe_or_errors(s3_server: S3Server) -> None:
    client = make_client(s3_server.endpoint, "AKIDVISIBLE", "super-secret-value", region=s3_server.region)
    store = BucketStore(client, "missing-bucket-for-creds", "p")
    texts = [store.describe(), repr(store)]
    for call in (lambda: store.read("k"), lambda: list(store.list()), lambda: store.write("k", b"")):
        with pytest.raises(StoreError) as caught:
            call()
        texts.append(str(caught.value))
    for text in texts:
        assert "AKIDVISIBLE" not in text and "super-secret-value" not in text, text


def test_make_client_accepts_a_url_endpoint(s3_server: S3Server, s3_bucket) -> None:
    _, bucket = s3_bucket
    client = make_client(s3_server.url, s3_server.access_key, s3_server.secret_key)
    store = BucketStore(client, bucket)
    store.write("k", b"v")
    assert store.read("k") == b"v"
    assert store.endpoint == s3_server.url
