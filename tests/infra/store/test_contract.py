"""The Store contract, run unchanged against a folder, a bucket, and a prefix in a bucket.

Why one suite: the pipeline must not care which store it runs on, so any behaviour that differs
between them is a bug in one of them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.store import ObjectInfo, Store, StoreError, UnsafeKeyError, check_key

ODD_KEYS = [
    "plain.png",
    "with space/and more spaces.json",
    "ünïcødé/画像 ✓.png",
    "plus+sign/a+b=c.png",
    "percent%20and&amp;?.json",
    "deep/er/and/deeper/still/x.bin",
    ".hidden",
    "dir/.x.png.3f2a.tmp",
]
UNSAFE_KEYS = ["../x", "/abs", "a/../../b", "a/..", "..", "a/./b", "a//b", "a\\b", "nul\x00", ""]


def keys(store: Store, prefix: str = "") -> list[str]:
    return sorted(info.key for info in store.list(prefix))


def test_write_read_stat_roundtrip(store: Store) -> None:
    store.write("a/b.json", b'{"prompt": "waves"}', content_type="application/json")
    assert store.read("a/b.json") == b'{"prompt": "waves"}'
    info = store.stat("a/b.json")
    assert isinstance(info, ObjectInfo)
    assert (info.key, info.size) == ("a/b.json", 19)
    assert info.version
    assert list(store.list()) == [info]


@pytest.mark.parametrize("key", ODD_KEYS)
def test_odd_keys_roundtrip_and_list_verbatim(store: Store, key: str) -> None:
    store.write(key, key.encode())
    assert store.read(key) == key.encode()
    assert keys(store) == [key]
    assert store.stat(key) == next(iter(store.list()))


def test_overwrite_replaces_whole_object(store: Store) -> None:
    store.write("k", b"old content, longer")
    store.write("k", b"new")
    assert store.read("k") == b"new"
    assert store.stat("k").size == 3


def test_missing_object(store: Store) -> None:
    assert store.stat("nope/missing.png") is None
    with pytest.raises(FileNotFoundError):
        store.read("nope/missing.png")
    with pytest.raises(FileNotFoundError):
        store.open("nope/missing.png")
    store.delete("nope/missing.png")  # deleting a missing object is not an error


def test_list_prefix_is_a_string_prefix(store: Store) -> None:
    for key in ["a/1", "a/2", "a/sub/3", "ab/4", "b/5", "a.txt"]:
        store.write(key, b"x")
    assert keys(store) == ["a.txt", "a/1", "a/2", "a/sub/3", "ab/4", "b/5"]
    assert keys(store, "a/") == ["a/1", "a/2", "a/sub/3"]
    assert keys(store, "a") == ["a.txt", "a/1", "a/2", "a/sub/3", "ab/4"]
    assert keys(store, "a/sub/") == ["a/sub/3"]
    assert keys(store, "a/s") == ["a/sub/3"]
    assert keys(store, "zzz/") == []
    assert keys(store, "zzz") == []


def test_list_reports_size_and_version(store: Store) -> None:
    store.write("x/one", b"1")
    store.write("x/three", b"333")
    infos = {i.key: i for i in store.list("x/")}
    assert {k: i.size for k, i in infos.items()} == {"x/one": 1, "x/three": 3}
    assert all(i.version for i in infos.values())


def test_delete(store: Store) -> None:
    store.write("d/1", b"1")
    store.write("d/2", b"2")
    store.delete("d/1")
    assert store.stat("d/1") is None
    assert keys(store) == ["d/2"]


def test_write_file_streams_a_local_file(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src.mp4"
    src.write_bytes(bytes(range(256)) * 4096)
    store.write_file("out/video.mp4", str(src), content_type="video/mp4")
    assert store.read("out/video.mp4") == src.read_bytes()
    assert store.stat("out/video.mp4").size == 256 * 4096


def test_write_file_of_missing_source_fails_cleanly(store: Store, tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        store.write_file("out/x.mp4", str(tmp_path / "does-not-exist.mp4"))
    assert keys(store) == []


def test_writes_leave_no_temp_objects(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"f" * 10_000)
    for i in range(5):
        store.write(f"t/{i}.bin", b"x" * i)
        store.write_file(f"t/{i}.file", str(src))
    assert keys(store) == sorted([f"t/{i}.bin" for i in range(5)] + [f"t/{i}.file" for i in range(5)])


def test_read_max_bytes(store: Store) -> None:
    store.write("big.png", b"x" * 1000)
    assert store.read("big.png", max_bytes=1000) == b"x" * 1000
    with pytest.raises(StoreError, match="1000"):
        store.read("big.png", max_bytes=999)
    with pytest.raises(StoreError):
        store.read("big.png", max_bytes=0)


def test_open_streams_in_chunks(store: Store) -> None:
    data = bytes(range(256)) * 1000
    store.write("s.bin", data)
    with store.open("s.bin") as f:
        head = f.read(10)
        rest = f.read()
    assert head + rest == data
    assert f.closed


@pytest.mark.parametrize("key", UNSAFE_KEYS)
@pytest.mark.parametrize("op", ["read", "open", "stat", "write", "delete", "url", "write_file"])
def test_unsafe_keys_refused(store: Store, key: str, op: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"payload")
    call = {
        "read": lambda: store.read(key),
        "open": lambda: store.open(key),
        "stat": lambda: store.stat(key),
        "write": lambda: store.write(key, b"payload"),
        "delete": lambda: store.delete(key),
        "url": lambda: store.url(key),
        "write_file": lambda: store.write_file(key, str(src)),
    }[op]
    with pytest.raises(UnsafeKeyError):
        call()
    assert keys(store) == []


@pytest.mark.parametrize(
    ("key", "why"),
    [("/abs", "absolute"), ("a/../b", "'..'"), ("a//b", "empty"), ("x\x00", "NUL"), ("", "empty")],
)
def test_check_key_says_why(key: str, why: str) -> None:
    with pytest.raises(UnsafeKeyError, match=why):
        check_key(key)
    assert check_key("a/b c/ü+.png") == "a/b c/ü+.png"
    assert check_key("", prefix=True) == "" and check_key("a/", prefix=True) == "a/"


@pytest.mark.parametrize("prefix", ["../", "/etc/", "a/../../", "a\\"])
def test_unsafe_list_prefix_refused(store: Store, prefix: str) -> None:
    with pytest.raises(UnsafeKeyError):
        list(store.list(prefix))


def test_url_and_describe_name_the_location(store: Store) -> None:
    url = store.url("a/b c.png")
    assert url.startswith(("file://", "s3://"))
    assert "a/b" in url
    assert store.describe()
