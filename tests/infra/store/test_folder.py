"""FolderStore specifics: symlinks, atomic writes under failure, the file:// URL."""

from __future__ import annotations

import errno
import os
import stat
import tracemalloc
import urllib.request
from pathlib import Path

import pytest

from infra.store import FolderStore, StoreError, UnsafeKeyError


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"do not leak")
    return outside


def on_disk(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_symlinked_file_escaping_root_is_refused(root: Path, outside: Path) -> None:
    (root / "link.txt").symlink_to(outside / "secret.txt")
    store = FolderStore(root)
    for call in (store.read, store.open, store.stat, store.url):
        with pytest.raises(UnsafeKeyError):
            call("link.txt")
    assert [i.key for i in store.list()] == ["link.txt"], "listed, so the watcher can refuse it loudly"


def test_symlinked_dir_escaping_root_is_refused_and_not_walked(root: Path, outside: Path) -> None:
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    store = FolderStore(root)
    with pytest.raises(UnsafeKeyError):
        store.read("linkdir/secret.txt")
    with pytest.raises(UnsafeKeyError):
        store.write("linkdir/planted.txt", b"x")
    assert not (outside / "planted.txt").exists()
    assert [i.key for i in store.list()] == []
    with pytest.raises(UnsafeKeyError):
        list(store.list("linkdir/"))


def test_symlink_inside_root_is_readable_and_listed(root: Path) -> None:
    (root / "real.txt").write_bytes(b"real")
    (root / "alias.txt").symlink_to(root / "real.txt")
    store = FolderStore(root)
    assert store.read("alias.txt") == b"real"
    assert [i.key for i in store.list()] == ["alias.txt", "real.txt"]


def test_symlink_loop_does_not_hang_listing(root: Path) -> None:
    (root / "a").mkdir()
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    (root / "a" / "f").write_bytes(b"1")
    assert [i.key for i in FolderStore(root).list()] == ["a/f"]


def test_root_itself_may_be_a_symlink(tmp_path: Path, root: Path) -> None:
    (tmp_path / "via-link").symlink_to(root, target_is_directory=True)
    store = FolderStore(tmp_path / "via-link")
    store.write("x/y", b"ok")
    assert (root / "x" / "y").read_bytes() == b"ok"


def test_list_includes_hidden_and_temp_names(root: Path) -> None:
    (root / ".hidden").write_bytes(b"")
    (root / "d").mkdir()
    (root / "d" / ".img.png.abc123.tmp").write_bytes(b"partial")
    (root / "d" / "empty-dir").mkdir()
    infos = list(FolderStore(root).list())
    assert [(i.key, i.size) for i in infos] == [(".hidden", 0), ("d/.img.png.abc123.tmp", 7)]


def test_version_is_mtime_ns(root: Path) -> None:
    store = FolderStore(root)
    store.write("v", b"1")
    os.utime(root / "v", ns=(1_000_000_123, 2_000_000_456))
    assert store.stat("v").version == "2000000456"
    assert next(iter(store.list())).version == "2000000456"


def test_write_is_atomic_via_hidden_temp_then_rename(root: Path, monkeypatch) -> None:
    seen: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src, dst):  # noqa: ANN001
        seen.append((Path(src).name, Path(dst).name))
        assert Path(src).parent == Path(dst).parent
        assert not Path(dst).exists()  # nothing under the final name before the rename
        real_replace(src, dst)

    synced: list[bool] = []
    real_fsync = os.fsync

    def fsync_spy(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "replace", spy)
    monkeypatch.setattr(os, "fsync", fsync_spy)
    FolderStore(root).write("sub/clip.mp4", b"frames")
    assert synced == [False, True]  # the data before the rename, the directory after it
    ((tmp, final),) = seen
    assert final == "clip.mp4"
    assert tmp.startswith(".clip.mp4.") and tmp.endswith(".tmp")
    assert on_disk(root) == ["sub/clip.mp4"]


KILLED_MID_WRITE = """
import sys, time
from infra.store import FolderStore

def stuck(handle):
    handle.write(b"half a video")
    handle.flush()
    print("writing", flush=True)
    time.sleep(60)

FolderStore(sys.argv[1])._atomic("sub/clip.mp4", stuck)
"""


def test_a_writer_killed_mid_write_leaves_a_temp_the_next_writer_removes(root: Path) -> None:
    """A process killed while writing (its flow run died with its worker) cannot clean up; the
    next write of that name removes what a dead writer of this host left, and only that."""
    import signal
    import subprocess
    import sys

    writer = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(root)], stdout=subprocess.PIPE,
                              cwd=Path(__file__).parents[3])
    assert writer.stdout is not None and writer.stdout.readline() == b"writing\n"
    live = root / "sub" / f".clip.mp4.{os.uname().nodename}.{os.getpid()}.0123456789ab.tmp"
    other_host = root / "sub" / ".clip.mp4.elsewhere.1.0123456789ab.tmp"
    for temp in (live, other_host):
        temp.write_bytes(b"someone else's")
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(10)
    dead = [p.name for p in (root / "sub").iterdir() if p not in (live, other_host)]
    assert len(dead) == 1 and dead[0].startswith(".clip.mp4.") and f".{writer.pid}." in dead[0], dead

    FolderStore(root).write("sub/clip.mp4", b"the video")

    assert sorted(p.name for p in (root / "sub").iterdir()) == sorted(["clip.mp4", live.name, other_host.name])
    assert (root / "sub" / "clip.mp4").read_bytes() == b"the video"


@pytest.mark.parametrize("method", ["write", "write_file"])
def test_disk_full_leaves_neither_temp_nor_partial_file(root: Path, tmp_path: Path, monkeypatch, method: str) -> None:
    store = FolderStore(root)
    store.write("out/v.mp4", b"previous version")
    src = tmp_path / "new.mp4"
    src.write_bytes(b"n" * 100_000)

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StoreError, match="No space left"):
        if method == "write":
            store.write("out/v.mp4", b"n" * 100_000)
        else:
            store.write_file("out/v.mp4", str(src))
    assert on_disk(root) == ["out/v.mp4"]
    assert (root / "out" / "v.mp4").read_bytes() == b"previous version"


def test_failed_first_write_leaves_no_final_name(root: Path, monkeypatch) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
    with pytest.raises(StoreError):
        FolderStore(root).write("new/one.png", b"x")
    assert on_disk(root) == []


def test_read_checks_size_before_reading(root: Path) -> None:
    huge = root / "huge.png"
    with huge.open("wb") as f:
        f.truncate(8 * 1024**3)  # sparse: costs nothing on disk, but reading it would
    tracemalloc.start()
    try:
        with pytest.raises(StoreError, match=f"is {8 * 1024**3} bytes"):
            FolderStore(root).read("huge.png", max_bytes=1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024**2, f"{peak} bytes allocated: the file was read before its size was checked"


def test_directory_is_not_an_object(root: Path) -> None:
    (root / "d").mkdir()
    store = FolderStore(root)
    assert store.stat("d") is None
    with pytest.raises(FileNotFoundError):
        store.read("d")
    store.delete("d")
    assert (root / "d").is_dir()


def test_url_is_an_openable_file_uri(root: Path) -> None:
    store = FolderStore(root)
    store.write("ü dir/a+b #1.png", b"pixels")
    url = store.url("ü dir/a+b #1.png")
    assert url.startswith("file:///") and " " not in url and "#" not in url
    with urllib.request.urlopen(url) as response:
        assert response.read() == b"pixels"
    assert store.describe() == str(root.resolve())


def test_missing_root_lists_nothing(tmp_path: Path) -> None:
    assert list(FolderStore(tmp_path / "not-yet").list()) == []
