"""A ``Store`` over an S3-compatible bucket (MinIO, AWS S3, Garage, SeaweedFS, moto...).

Why a thin wrapper over the ``minio`` client: the pipeline speaks keys, not buckets, and must
never hang on a dead server or leak credentials into logs. So this module maps keys under a
fixed prefix, turns every client/transport failure into a ``StoreError`` that names the
operation and the key (never the credentials), and builds clients with bounded timeouts and
retries (``make_client``).

S3 facts this relies on: a PUT replaces an object atomically, so ``write`` needs no temp
object; ``version`` is the ETag, which is the MD5 only for single-part uploads: multipart
ETags end in ``-N`` (the part count) and must be treated as opaque.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, BinaryIO

import structlog
import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from infra.store.base import ObjectInfo, StoreError
from infra.store.folder import check_key

log = structlog.get_logger(__name__)

PART_SIZE = 16 * 1024 * 1024  # multipart part size for write_file: bounded memory per part
_READ_CHUNK = 1024 * 1024
_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"})
_TRANSPORT_ERRORS = (MinioException, urllib3.exceptions.HTTPError, OSError)


def make_client(
    endpoint: str,
    access_key: str,
    secret_key: str,
    *,
    secure: bool = False,
    region: str | None = None,
    connect_timeout: float = 5.0,
    read_timeout: float = 30.0,
    retries: int = 3,
) -> Minio:
    """A minio client that fails within seconds instead of hanging on a dead server.

    Why not minio's default HTTP client: it waits up to five minutes per read and retries
    5xx answers five times. A pipeline that polls a bucket should notice an outage quickly and
    say so. ``endpoint`` may carry a scheme (``https://host:9000``), which then sets ``secure``.
    """
    match = re.fullmatch(r"(https?)://([^/]+)/?", endpoint)
    if match:
        secure, endpoint = match.group(1) == "https", match.group(2)
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
        retries=urllib3.Retry(total=retries, backoff_factor=0.5, status_forcelist=(500, 502, 503, 504)),
        maxsize=10,
    )
    return Minio(
        endpoint,
        access_key=access_key,
        secret_key=secret_key,
        secure=secure,
        region=region,
        http_client=http,
    )


class BucketStore:
    """Objects under ``s3://bucket/prefix``; key ``a/b.png`` is object ``prefix/a/b.png``."""

    def __init__(self, client: Minio, bucket: str, prefix: str = "") -> None:
        self._client = client
        self._bucket = bucket
        prefix = prefix.strip("/")
        self._prefix = f"{check_key(prefix, prefix=True)}/" if prefix else ""

    @property
    def client(self) -> Minio:
        """The underlying minio client (for bucket-level work such as notifications)."""
        return self._client

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def prefix(self) -> str:
        """The object-name prefix, empty or ending with ``/``."""
        return self._prefix

    @property
    def endpoint(self) -> str:
        """``http(s)://host:port`` of the server, for humans (no credentials)."""
        base = getattr(self._client, "_base_url", None)
        if base is None:
            return "unknown endpoint"
        return f"{'https' if base.is_https else 'http'}://{base.host}"

    def _name(self, key: str) -> str:
        return self._prefix + check_key(key)

    def _fail(self, op: str, key: str, exc: BaseException) -> StoreError:
        """A StoreError naming what failed, where, and why, scrubbed of any signed query."""
        where = f"s3://{self._bucket}/{self._prefix}{key}"
        return StoreError(f"s3 {op} of {where} at {self.endpoint} failed: {_reason(exc)}")

    # -- reading ---------------------------------------------------------------------------

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under ``prefix``, recursively, in S3 (lexicographic) order.

        Directory markers (names ending in ``/``, made by web consoles) and names that are not
        safe keys (``a/../b``) are skipped: no other method could address them.
        """
        check_key(prefix, prefix=True)
        try:
            objects = self._client.list_objects(self._bucket, prefix=self._prefix + prefix, recursive=True)
            for obj in objects:
                info = self._info(obj.object_name or "", obj.size, obj.etag)
                if info is not None:
                    yield info
        except _TRANSPORT_ERRORS as exc:
            raise self._fail("list", prefix, exc) from exc

    def _info(self, name: str, size: int | None, etag: str | None) -> ObjectInfo | None:
        key = name[len(self._prefix) :]
        if not key or key.endswith("/"):
            return None
        try:
            check_key(key)
        except StoreError:
            log.warning("store.unsafe_key_skipped", bucket=self._bucket, object=name)
            return None
        return ObjectInfo(key=key, size=size or 0, version=(etag or "").strip('"'))

    def stat(self, key: str) -> ObjectInfo | None:
        """The object's size and ETag, or None when there is no such object."""
        name = self._name(key)
        try:
            obj = self._client.stat_object(self._bucket, name)
        except S3Error as exc:
            if exc.code in _NOT_FOUND:
                return None
            raise self._fail("stat", key, exc) from exc
        except _TRANSPORT_ERRORS as exc:
            raise self._fail("stat", key, exc) from exc
        return ObjectInfo(key=key, size=obj.size or 0, version=(obj.etag or "").strip('"'))

    def _get(self, op: str, key: str) -> Any:
        """The streaming GET response; FileNotFoundError when missing."""
        try:
            return self._client.get_object(self._bucket, self._name(key))
        except S3Error as exc:
            if exc.code in _NOT_FOUND:
                raise FileNotFoundError(2, "no such object", key) from exc
            raise self._fail(op, key, exc) from exc
        except _TRANSPORT_ERRORS as exc:
            raise self._fail(op, key, exc) from exc

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        """The whole object, refused early (by Content-Length) when over ``max_bytes``."""
        with self.open(key) as body:
            length = int(getattr(body.raw, "length", None) or -1)
            if max_bytes is not None and length > max_bytes:
                raise StoreError(f"{key!r} is {length} bytes, more than the limit of {max_bytes}")
            chunks, total = [], 0
            while chunk := body.read(_READ_CHUNK):
                total += len(chunk)
                if max_bytes is not None and total > max_bytes:
                    raise StoreError(f"{key!r} is larger than the limit of {max_bytes} bytes")
                chunks.append(chunk)
        return b"".join(chunks)

    def open(self, key: str) -> BinaryIO:
        """A buffered stream of the object; closing it also returns the connection to the pool."""
        response = self._get("open", key)
        return io.BufferedReader(_ResponseBody(response, self, key), buffer_size=_READ_CHUNK)

    # -- writing ---------------------------------------------------------------------------

    def write(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """One PUT: S3 makes the new object visible all at once or not at all."""
        name = self._name(key)
        try:
            self._client.put_object(
                self._bucket, name, io.BytesIO(data), len(data), content_type=content_type
            )
        except _TRANSPORT_ERRORS as exc:
            raise self._fail("write", key, exc) from exc

    def write_file(self, key: str, path: str, content_type: str = "application/octet-stream") -> None:
        """Stream a local file; above ``PART_SIZE`` it goes multipart (ETag then ends in -N).

        A failed multipart upload never shows a partial object: S3 assembles the object only
        on CompleteMultipartUpload.
        """
        name = self._name(key)
        try:
            self._client.fput_object(
                self._bucket, name, str(path), content_type=content_type, part_size=PART_SIZE
            )
        except _TRANSPORT_ERRORS as exc:
            raise self._fail("write_file", key, exc) from exc

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing object succeeds, as in S3."""
        name = self._name(key)
        try:
            self._client.remove_object(self._bucket, name)
        except S3Error as exc:
            if exc.code in _NOT_FOUND:
                return
            raise self._fail("delete", key, exc) from exc
        except _TRANSPORT_ERRORS as exc:
            raise self._fail("delete", key, exc) from exc

    # -- naming ----------------------------------------------------------------------------

    def url(self, key: str) -> str:
        """``s3://bucket/prefix/key``: where the object is, not a link a browser can open."""
        return f"s3://{self._bucket}/{self._name(key)}"

    def presigned_url(self, key: str, expires: timedelta = timedelta(days=7)) -> str:
        """An HTTP GET link anyone can open until ``expires`` (at most 7 days in SigV4).

        The link embeds the access key id and a signature: hand it to people, never log it.
        """
        try:
            return self._client.presigned_get_object(self._bucket, self._name(key), expires)
        except _TRANSPORT_ERRORS as exc:
            raise self._fail("presign", key, exc) from exc

    def describe(self) -> str:
        """``s3://bucket/prefix at http://host:port``, without credentials."""
        return f"s3://{self._bucket}/{self._prefix} at {self.endpoint}"

    def __repr__(self) -> str:
        return f"BucketStore({self.describe()!r})"


class _ResponseBody(io.RawIOBase):
    """A urllib3 response as a raw stream whose ``close()`` also releases the connection.

    Why: minio documents that callers must call both ``close()`` and ``release_conn()``;
    forgetting the second leaks pooled connections until the pool blocks.
    """

    def __init__(self, response: Any, store: BucketStore, key: str) -> None:
        super().__init__()
        self._response = response
        self._store = store
        self._key = key
        self.length = response.headers.get("Content-Length")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            return self._response.readinto(buffer)
        except urllib3.exceptions.HTTPError as exc:
            raise self._store._fail("read", self._key, exc) from exc

    def close(self) -> None:
        if not self.closed:
            try:
                self._response.close()
                self._response.release_conn()
            finally:
                super().close()


def _reason(exc: BaseException) -> str:
    """A one-line cause: S3 error code and message, or the transport error without URLs."""
    if isinstance(exc, S3Error):
        return f"{exc.code}: {exc.message}"
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    text = re.sub(r"<[^>]*>:\s*", "", str(exc))  # drop "<HTTPConnection object at 0x..>: "
    text = re.sub(r"\?\S*", "?...", text)  # a URL query may carry a signature
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
