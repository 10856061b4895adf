"""Hostile input: every file gets its specific error report, the watcher stays up, nothing is
written outside the outbox, and no secret reaches a log, sidecar, error file or artifact."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from tests.helpers import FAST_SPEC, drop, png_bytes, png_claiming_size, tree_digest, wait_for


def _huge_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (9000, 5000), (10, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


HOSTILE = {
    # stem: (spec, image, expected error, expected field)
    "lying-header": ({"prompt": "p", **FAST_SPEC}, png_claiming_size(100_000, 100_000), "invalid_image", "image"),
    "huge-dimensions": ({"prompt": "p", **FAST_SPEC}, _huge_png(), "invalid_image", "image"),
    "truncated": ({"prompt": "p", **FAST_SPEC}, png_bytes(200, 200)[:300], "invalid_image", "image"),
    "deep-json": (b"[" * 10_000 + b"]" * 10_000, png_bytes(), "invalid_json", None),
    "long-json": (b'{"prompt": "' + b"x" * (50 * 1024 * 1024) + b'"}', png_bytes(), "spec_too_large", "spec"),
    "long-prompt": ({"prompt": "y" * 100_000}, png_bytes(), "invalid_spec", "prompt"),
    "bell\x07name": ({"prompt": "p", **FAST_SPEC}, png_bytes(), "unsafe_path", "image"),
    "traversal": ({"prompt": "p", "image": "../../../../etc/hostname"}, None, "unsafe_path", "image"),
}


def test_hostile_inputs_each_get_a_specific_report(start_watcher, tmp_path: Path) -> None:
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes())
    for stem, (spec, image, _, _) in HOSTILE.items():
        drop(inbox, stem, spec, image)
    drop(inbox, "linked", {"prompt": "p", **FAST_SPEC})
    (inbox / "linked.png").symlink_to(outside / "secret.png")
    expected = {**HOSTILE, "linked": (None, None, "unsafe_path", "image")}
    before_outside = tree_digest(outside)
    start_watcher(inbox, outbox)

    for stem, (_, _, error, field) in expected.items():
        path = outbox / f"{stem.replace(chr(7), '')}.error.json"  # reported under its printable name
        wait_for(path.exists, timeout=240, what=f"error file for {stem!r}")
        report = json.loads(path.read_text())
        assert report["error"] == error, (stem, report)
        if field:
            assert report["problems"][0]["field"] == field, (stem, report)
        assert not list(outbox.glob(f"{stem}*.mp4"))

    # The watcher is still up: a good drop afterwards becomes a video.
    drop(inbox, "after", {"prompt": "still working", **FAST_SPEC}, png_bytes(color=(0, 250, 0)))
    wait_for((outbox / "after.mp4").exists, timeout=180, what="a good video after the hostile batch")
    assert tree_digest(outside) == before_outside
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()}
    assert written <= {"inbox", "outbox", "outside", "state"}, written


def test_no_secret_reaches_logs_sidecars_error_files_or_artifacts(service, s3_server, tmp_path: Path) -> None:
    """The workers hold the S3 secret key in their environment; it must not leak anywhere."""
    secret = s3_server.secret_key
    assert service.env["I2VFLOW_S3_SECRET_KEY"] == secret
    haystacks = [p for p in service.state_dir.rglob("*") if p.is_file() and p.suffix in {".log", ".json"}]
    haystacks += [p for p in tmp_path.parent.rglob("*") if p.is_file() and p.suffix == ".json"
                  and p.stat().st_size < 5_000_000]
    assert haystacks, "nothing to check: the session produced no logs or sidecars"
    leaks = [str(p) for p in haystacks if secret in p.read_text(errors="replace")]
    assert leaks == [], f"secret found in {leaks}"
    from prefect import get_client

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(limit=200)
    assert all(secret not in json.dumps(a.data, default=str) for a in artifacts)
