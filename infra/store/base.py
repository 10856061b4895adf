"""The one storage interface that flows, tasks and the watcher speak.

Why: the pipeline must not know whether it runs on a folder or an S3-compatible bucket.
Keys are relative POSIX paths (``shoes/red.png``) everywhere; each store maps them to its
own namespace and refuses keys that would escape it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol, runtime_checkable


class StoreError(Exception):
    """A store operation failed for a reason other than a missing object."""


class UnsafeKeyError(StoreError, ValueError):
    """A key is absolute, contains '..', or otherwise escapes the store's root."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing says about one object: enough to tell whether it is still changing.

    ``version`` is an opaque identity of the content as the store sees it (mtime in ns for a
    folder, the ETag for a bucket); it is not a content hash.
    """

    key: str
    size: int
    version: str


@runtime_checkable
class Store(Protocol):
    """A flat namespace of objects addressed by relative POSIX keys."""

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` (recursive), hidden and temp names included."""
        ...

    def stat(self, key: str) -> ObjectInfo | None:
        """The object's info, or None when it does not exist."""
        ...

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        """The whole object. Raises FileNotFoundError when missing, StoreError when larger
        than ``max_bytes``."""
        ...

    def open(self, key: str) -> BinaryIO:
        """A readable binary stream of the object (caller closes it)."""
        ...

    def write(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write atomically: readers see the old object or the whole new one, never a part."""
        ...

    def write_file(self, key: str, path: str, content_type: str = "application/octet-stream") -> None:
        """Write a local file atomically, streaming it (multipart for large objects)."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object if it exists."""
        ...

    def url(self, key: str) -> str:
        """A location a person can open: file:// path or s3:// URL."""
        ...

    def describe(self) -> str:
        """A short human label for logs, without credentials."""
        ...
