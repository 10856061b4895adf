"""A ``Store`` over a local folder: the inbox/outbox when no bucket is involved.

Why these rules: the folder is written by people and other programs while we read it, and keys
come from file names we do not control. So every key is checked before it touches the disk
(no absolute paths, no ``..``, no NUL or backslash, nothing that resolves outside the root,
symlinks included), and every write goes to a hidden temp file that is fsynced and renamed
into place, so a reader sees the old file or the whole new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from infra.store.base import ObjectInfo, StoreError, UnsafeKeyError

_COPY_CHUNK = 1024 * 1024
_HOST = socket.gethostname()
_NAME_MAX = 255


def check_key(key: str, *, prefix: bool = False) -> str:
    """Return ``key`` unchanged if it is a safe relative POSIX key, else raise UnsafeKeyError.

    Why refuse instead of normalizing: one object must have exactly one key, and a key that
    needs fixing is a sign of a bug or an attack. ``prefix=True`` accepts ``""`` and a trailing
    ``/`` (``shoes/``), which are meaningful for listing but never name an object.
    """
    if not isinstance(key, str):
        raise UnsafeKeyError(f"key must be a str, got {type(key).__name__}")
    if key == "" and prefix:
        return key
    if key == "":
        raise UnsafeKeyError("key is empty")
    if "\x00" in key or "\\" in key:
        raise UnsafeKeyError(f"key {key!r} contains NUL or a backslash")
    if key.startswith("/"):
        raise UnsafeKeyError(f"key {key!r} is absolute")
    parts = key.split("/")
    if prefix and parts[-1] == "":
        parts = parts[:-1]
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafeKeyError(f"key {key!r} has an empty, '.' or '..' segment")
    return key


class FolderStore:
    """Objects are the regular files under ``root``; keys are their POSIX paths relative to it."""

    def __init__(self, root: Path | str) -> None:
        self._root = Path(root).resolve()

    @property
    def root(self) -> Path:
        """The resolved root folder."""
        return self._root

    # -- keys -> paths ---------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        """The path of ``key``, refused when it (or a symlink on the way) leaves the root."""
        check_key(key)
        path = self._root.joinpath(*key.split("/"))
        resolved = path.resolve()
        if resolved != self._root and not resolved.is_relative_to(self._root):
            raise UnsafeKeyError(f"key {key!r} resolves outside the store root")
        return path

    # -- reading ---------------------------------------------------------------------------

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every regular file whose key starts with ``prefix``, hidden and temp names included.

        Symlinked folders are not walked: a link could point anywhere, and listing must never
        walk out of the root or loop. Symlinked files are listed with the link's own size and
        time; reading one that points outside the root raises UnsafeKeyError. Files that
        vanish mid-walk are skipped.
        """
        check_key(prefix, prefix=True)
        base_key = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self._path(base_key) if base_key else self._root
        for info in self._walk(start, f"{base_key}/" if base_key else ""):
            if info.key.startswith(prefix):
                yield info

    def _walk(self, folder: Path, key_prefix: str) -> Iterator[ObjectInfo]:
        """Depth-first scan of ``folder`` in name order, yielding regular files only."""
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise StoreError(f"cannot list {folder}: {exc.strerror or exc}") from exc
        for entry in entries:
            key = key_prefix + entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    yield from self._walk(Path(entry.path), key + "/")
                elif entry.is_file(follow_symlinks=False) or (entry.is_symlink() and not entry.is_dir()):
                    # File symlinks are listed (never followed here) so that one pointing out of
                    # the root becomes a refused job with an error report, not a silent gap.
                    st = entry.stat(follow_symlinks=False)
                    yield ObjectInfo(key=key, size=st.st_size, version=str(st.st_mtime_ns))
            except FileNotFoundError:
                continue

    def stat(self, key: str) -> ObjectInfo | None:
        """The file's info, or None when it is missing or not a regular file."""
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StoreError(f"cannot stat {key!r} in {self.describe()}: {exc.strerror}") from exc
        if not path.is_file():
            return None
        return ObjectInfo(key=key, size=st.st_size, version=str(st.st_mtime_ns))

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        """The whole file; the size is checked before reading so a huge file costs nothing."""
        with self.open(key) as f:
            size = os.fstat(f.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise StoreError(f"{key!r} is {size} bytes, more than the limit of {max_bytes}")
            # The file may grow between fstat and read: never read more than the cap + 1.
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise StoreError(f"{key!r} grew past the limit of {max_bytes} bytes while reading")
        return data

    def open(self, key: str) -> BinaryIO:
        """The file opened for binary reading. FileNotFoundError when missing or a directory."""
        path = self._path(key)
        try:
            return path.open("rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise FileNotFoundError(errno.ENOENT, "no such object", key) from exc
        except OSError as exc:
            raise StoreError(f"cannot open {key!r} in {self.describe()}: {exc.strerror}") from exc

    # -- writing ---------------------------------------------------------------------------

    def write(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write ``data`` atomically (``content_type`` is meaningless on a disk and ignored)."""
        self._atomic(key, lambda f: f.write(data))

    def write_file(self, key: str, path: str, content_type: str = "application/octet-stream") -> None:
        """Copy the local file at ``path`` atomically, streaming it in 1 MiB chunks."""

        def copy(f: BinaryIO) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, _COPY_CHUNK)

        self._atomic(key, copy)

    def _atomic(self, key: str, fill: Callable[[BinaryIO], object]) -> None:
        """Fill ``.<name>.<host>.<pid>.<random>.tmp`` next to the target, fsync it, rename it
        into place.

        Why the same directory: ``os.replace`` is atomic only within one file system. On any
        failure (ENOSPC, EIO, a missing source file) the temp file is removed and nothing ever
        appears under the final name. A writer killed mid-write cannot remove its own: the next
        writer of the same name removes temp files of writers on this host that are gone.
        """
        final = self._path(key)
        tmp = final.with_name(_temp_name(final.name))
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._path(key)  # re-check: mkdir may have met a symlink planted meanwhile
            _remove_dead_writers_temps(final)
            with open(tmp, "xb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except UnsafeKeyError:
            tmp.unlink(missing_ok=True)
            raise
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            reason = exc.strerror or str(exc)
            raise StoreError(f"cannot write {key!r} in {self.describe()}: {reason}") from exc

    def delete(self, key: str) -> None:
        """Remove the file if it exists (a missing file is not an error)."""
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except IsADirectoryError:
            return
        except OSError as exc:
            raise StoreError(f"cannot delete {key!r} in {self.describe()}: {exc.strerror}") from exc

    # -- naming ----------------------------------------------------------------------------

    def url(self, key: str) -> str:
        """A ``file://`` URI of the object, percent-encoded."""
        return self._path(key).as_uri()

    def describe(self) -> str:
        """The root folder, for logs."""
        return str(self._root)

    def __repr__(self) -> str:
        return f"FolderStore({str(self._root)!r})"


def _temp_name(name: str) -> str:
    """The temp name for ``name``, naming its writer; a name too long for that gets a plain one."""
    named = f".{name}.{_HOST}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    return named if len(os.fsencode(named)) <= _NAME_MAX else f".{name[:200]}.{secrets.token_hex(6)}.tmp"


def _remove_dead_writers_temps(final: Path) -> None:
    """Remove ``final``'s temp files whose writer was a process of this host that no longer
    exists. Another host's or a live writer's stay; a pid reused since only delays the cleanup."""
    prefix = f".{final.name}."
    for temp in final.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        host, _, pid = temp.name[len(prefix):-len(".tmp")].rpartition(".")[0].rpartition(".")
        if host == _HOST and pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):  # litter at worst; the write itself goes on
                temp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself: without it a crash may forget the new directory entry."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the data itself is already safe
    finally:
        os.close(fd)
