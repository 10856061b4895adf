"""The campaign flow, called in this process against the real Prefect server and the real GPU
task worker (tiny model): variants into a dated slot, idempotent reruns, resume after a cap,
a later slot, and a bad spec refused before anything renders."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.engine.video import probe_mp4
from tests.helpers import FAST_SPEC, drop, png_bytes


@pytest.fixture(scope="module")
def worker_side(service) -> Iterator[object]:
    """Share result storage with the GPU worker: `.delay()` hands parameters over through it."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: service.env["PREFECT_LOCAL_STORAGE_PATH"]}):
        yield service


def _inbox(tmp_path: Path, stems: list[str]) -> tuple[Path, Path]:
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    colors = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (40, 200, 200)]
    for index, stem in enumerate(stems):
        spec = {"prompt": f"product {stem} rotating", **FAST_SPEC}
        drop(inbox, stem, spec, png_bytes(color=colors[index % 5]))
    outbox.mkdir(parents=True)
    return inbox, outbox


def _run(spec: dict, inbox: Path, outbox: Path, **kwargs: object):
    from flows.campaign import run_campaign

    state = run_campaign(spec=spec, inbox=str(inbox), outbox=str(outbox), return_state=True, **kwargs)
    return state


def _videos(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.mp4"))


def test_variants_render_into_dated_slot_and_rerun_renders_nothing(worker_side, tmp_path: Path) -> None:
    inbox, outbox = _inbox(tmp_path, ["shoes/red", "shoes/blue", "bags/tote"])
    spec = {"name": "spring-shoes", "selection": {"prefix": "shoes/"},
            "overrides": {"prompt": "{prompt}, spring light", "width": 64, "height": 64},
            "variants": {"grid": {"seed": [1, 2]}}}
    state = _run(spec, inbox, outbox, run_date="2026-03-02")
    assert state.is_completed(), state.message
    slot = "campaigns/spring-shoes/2026-03-02"
    assert _videos(outbox) == [f"{slot}/shoes/{s}__seed{n}.mp4" for s in ("blue", "red") for n in (1, 2)]
    for key in _videos(outbox):
        video = probe_mp4(outbox / key)
        assert (video.frames, video.width, video.height) == (8, 64, 64)
    sidecar = json.loads((outbox / slot / "shoes/red__seed2.json").read_text())
    assert sidecar["seed"] == 2 and sidecar["spec"]["prompt"] == "product shoes/red rotating, spring light"
    assert sidecar["campaign"] == {"name": "spring-shoes", "run_date": "2026-03-02", "variant": "seed2",
                                   "overrides": spec["overrides"] | {"seed": 2}, "input_stem": "shoes/red"}
    assert sidecar["inputs"]["image"]["key"] == "shoes/red.png"
    sheet = outbox / slot / "contact-sheet.png"
    from PIL import Image

    with Image.open(sheet) as image:
        assert image.height >= 4 * 96  # one row per item
    report = json.loads((outbox / slot / "campaign.json").read_text())
    assert report["counts"] == {"rendered": 4}

    again = _run(spec, inbox, outbox, run_date="2026-03-02")
    assert again.is_completed()
    report = json.loads((outbox / slot / "campaign.json").read_text())
    assert report["counts"] == {"done earlier": 4} and report["rendered_this_run"] == 0
    assert len(_videos(outbox)) == 4


def test_crash_midway_then_resume_renders_only_the_rest(worker_side, tmp_path: Path) -> None:
    inbox, outbox = _inbox(tmp_path, ["a", "b", "c"])
    spec = {"name": "resume", "overrides": {"steps": 10}}
    first = _run(spec, inbox, outbox, run_date="2026-03-02", max_items=1)
    assert first.is_completed()
    slot = outbox / "campaigns/resume/2026-03-02"
    assert [p.name for p in sorted(slot.glob("*.mp4"))] == ["a__base.mp4"]
    stamp = (slot / "a__base.json").stat().st_mtime_ns

    resumed = _run(spec, inbox, outbox, run_date="2026-03-02")
    assert resumed.is_completed()
    report = json.loads((slot / "campaign.json").read_text())
    assert report["counts"] == {"done earlier": 1, "rendered": 2}
    assert [p.name for p in sorted(slot.glob("*.mp4"))] == ["a__base.mp4", "b__base.mp4", "c__base.mp4"]
    assert (slot / "a__base.json").stat().st_mtime_ns == stamp, "a finished item is never rendered again"

    # The next Monday is a new slot: everything renders again, into its own prefix.
    later = _run(spec | {"selection": {"limit": 1}}, inbox, outbox, run_date="2026-03-09")
    assert later.is_completed()
    assert _videos(outbox / "campaigns/resume/2026-03-09") == ["a__base.mp4"]


def test_bad_spec_is_refused_before_anything_renders(worker_side, tmp_path: Path) -> None:
    inbox, outbox = _inbox(tmp_path, ["a"])
    state = _run({"name": "bad", "overrides": {"num_frame": 24, "steps": 5}}, inbox, outbox)
    assert state.is_failed()
    assert "overrides.num_frame: unknown job-spec field 'num_frame'" in state.message
    assert "overrides.steps" in state.message and "greater than or equal to 10" in state.message
    assert _videos(outbox) == []


def test_an_item_that_fails_validation_gets_an_error_report(worker_side, tmp_path: Path) -> None:
    inbox, outbox = _inbox(tmp_path, ["ok"])
    drop(inbox, "broken", {"prompt": "x", "num_frames": 8, "steps": 10, "width": 64}, png_bytes())
    state = _run({"name": "mixed"}, inbox, outbox, run_date="2026-03-02")
    assert state.is_failed() and "1 failed" in state.message and "1 rendered" in state.message
    error = json.loads((outbox / "campaigns/mixed/2026-03-02/broken__base.error.json").read_text())
    assert error["error"] == "invalid_spec"
