"""Drop files into a watched folder, get videos: the whole path on the real stack.

A real Prefect server, a real process worker starting a process per flow run, the real GPU
task worker holding the tiny model, real watchdog events on real folders, real MP4s decoded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from infra.engine.video import probe_mp4
from tests.helpers import (
    FAST_SPEC,
    drop,
    flow_runs_named,
    png_bytes,
    png_claiming_size,
    structlog_events_in_prefect,
    tree_digest,
    wait_for,
    wait_for_scans,
)


def _sidecar(outbox: Path, stem: str) -> dict:
    path = outbox / f"{stem}.json"
    wait_for(path.exists, what=f"sidecar {path}")
    return json.loads(path.read_text())


def test_drop_gives_video_and_sidecar(start_watcher, tmp_path: Path) -> None:
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    drop(inbox, "shoe", {"prompt": "product rotating slowly under studio light", **FAST_SPEC}, png_bytes())
    before = tree_digest(inbox)
    start_watcher(inbox, outbox)

    sidecar = _sidecar(outbox, "shoe")
    video = probe_mp4(outbox / "shoe.mp4")
    assert (video.frames, video.width, video.height) == (8, 64, 64)
    assert round(video.fps) == 8
    assert sidecar["frames"] == 8 and sidecar["model"]["is_noise"] is True
    assert "noise" in sidecar["model"]["warning"]
    assert sidecar["inputs"]["image"]["key"] == "shoe.png"
    assert set(sidecar["timings_seconds"]) >= {"load_inputs", "render", "encode_on_gpu_worker", "model_load"}
    # What the engine really ran: speed levers (none on a CPU) and every requested step.
    assert sidecar["engine"]["speed"]["preset"] == "stock" and sidecar["engine"]["speed"]["scheduler"] == "default"
    assert sidecar["engine"]["steps_run"] == sidecar["engine"]["steps_guided"] == 10
    assert tree_digest(inbox) == before, "inputs must never be modified"
    runs = flow_runs_named([f"shoe-{sidecar['job_id'][:6]}"])
    assert len(runs) == 1 and str(runs[0].id) == sidecar["prefect"]["flow_run_id"]
    assert {"source:folder", "model:tiny"} <= set(runs[0].tags)
    assert sidecar["prefect"]["flow_run_url"].endswith(f"/runs/flow-run/{sidecar['prefect']['flow_run_id']}")
    # The render was handed over at detection: its logs are its own task run's, which the flow's name.
    events = structlog_events_in_prefect(sidecar["prefect"]["flow_run_id"], sidecar["prefect"]["render_task_run_id"])
    assert {"job.done", "render.handed_over", "render.done", "video.published"} <= set(events), events



def test_names_subfolders_defaults_and_either_order(start_watcher, tmp_path: Path) -> None:
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    start_watcher(inbox, outbox)
    # JSON first, image a moment later; a name with spaces, dots and unicode in a subfolder.
    drop(inbox, "shoes/red shoe.v2 ünï", {"prompt": "camera slowly zooming in", **FAST_SPEC, "fps": 12})
    time.sleep(1.5)
    drop(inbox, "shoes/red shoe.v2 ünï", None, png_bytes(128, 96, (10, 200, 10)))
    # One defaults file, two images without their own JSON.
    drop(inbox, "batch/_defaults", {"prompt": "clouds moving", **FAST_SPEC})
    drop(inbox, "batch/a", None, png_bytes(color=(1, 2, 250)))
    drop(inbox, "batch/b", None, png_bytes(color=(250, 2, 1)))
    # Ignored: hidden, temp and partial files.
    drop(inbox, ".hidden", {"prompt": "x"}, png_bytes())
    (inbox / "upload.png.part").write_bytes(b"partial")

    red = _sidecar(outbox, "shoes/red shoe.v2 ünï")
    video = probe_mp4(outbox / "shoes" / "red shoe.v2 ünï.mp4")
    assert (video.width, video.height, round(video.fps)) == (88, 64, 12)  # aspect kept, short side 64
    assert red["spec"]["fps"] == 12
    for stem in ("batch/a", "batch/b"):
        sidecar = _sidecar(outbox, stem)
        assert sidecar["inputs"]["defaults"] == ["batch/_defaults.json"]
        assert sidecar["spec"]["prompt"] == "clouds moving"
    assert probe_mp4(outbox / "batch" / "a.mp4").frames == 8
    assert not (outbox / ".hidden.mp4").exists() and not list(outbox.glob("upload*"))


BAD_INPUTS = {
    # stem: (spec, image bytes, expected error, expected field)
    "not-an-image": ({"prompt": "p", **FAST_SPEC}, b"this is text, not a PNG", "invalid_image", "image"),
    "bomb": ({"prompt": "p", **FAST_SPEC}, png_claiming_size(60000, 60000), "invalid_image", "image"),
    "empty-image": ({"prompt": "p", **FAST_SPEC}, b"", "invalid_image", "image"),
    "broken-json": (b'{"prompt": "p",, }', png_bytes(), "invalid_json", None),
    "wrong-type": ({"prompt": "p", "num_frames": "many"}, png_bytes(), "invalid_spec", "num_frames"),
    "out-of-range": ({"prompt": "p", "fps": 100}, png_bytes(), "invalid_spec", "fps"),
    "unknown-key": ({"prompt": "p", "num_frame": 8}, png_bytes(), "invalid_spec", "num_frame"),
    "no-prompt": ({"steps": 10}, png_bytes(), "invalid_spec", "prompt"),
    "unknown-model": ({"prompt": "p", "model": "ali-vilab/i2vgen-x"}, png_bytes(), "unknown_model", "model"),
    "escape": ({"prompt": "p", "image": "../../etc/passwd.png"}, None, "unsafe_path", "image"),
}


def test_bad_inputs_get_specific_error_files_and_a_fix_gives_the_video(start_watcher, tmp_path: Path) -> None:
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    for stem, (spec, image, _, _) in BAD_INPUTS.items():
        drop(inbox, stem, spec, image)
    before = tree_digest(inbox)
    start_watcher(inbox, outbox)

    for stem, (_, _, error, field) in BAD_INPUTS.items():
        path = outbox / f"{stem}.error.json"
        wait_for(path.exists, what=f"error file for {stem}")
        report = json.loads(path.read_text())
        assert report["error"] == error, (stem, report)
        assert report["problems"] and report["problems"][0]["fix"], report
        if field:
            assert report["problems"][0]["field"] == field, (stem, report)
        assert not (outbox / f"{stem}.mp4").exists()
    assert tree_digest(inbox) == before, "bad inputs must be left untouched"
    name = f"wrong-type-{json.loads((outbox / 'wrong-type.error.json').read_text())['job_id'][:6]}"
    # The flow writes the error file, then ends Failed: its final state may land a moment later
    # (one retried API call on the SQLite server is ~2.4 s).
    def all_final() -> list | None:
        runs = flow_runs_named([name])
        return runs if runs and all(r.state and r.state.is_final() for r in runs) else None

    runs = wait_for(all_final, timeout=30, what="the bad input's run final")
    assert len(runs) == 1 and runs[0].state.is_failed() and runs[0].run_count == 1, "bad input: no retries"

    # The user fixes the JSON and drops it again: a new job, a video, the stale error removed.
    drop(inbox, "wrong-type", {"prompt": "p", "num_frames": 8, "steps": 10})
    wait_for((outbox / "wrong-type.mp4").exists, what="video after fix")
    wait_for(lambda: not (outbox / "wrong-type.error.json").exists(), what="stale error removed")
    assert probe_mp4(outbox / "wrong-type.mp4").frames == 8


def test_a_half_drop_is_reported_after_the_orphan_time_and_completing_it_gives_the_video(
        start_watcher, tmp_path: Path) -> None:
    """An image without its JSON, a JSON without its image, a JSON naming an image that is not there:
    each gets an error file saying what is missing (not silence), and dropping the rest makes the video."""
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    drop(inbox, "lonely", None, png_bytes(color=(10, 120, 10)))
    drop(inbox, "lost", {"prompt": "p", **FAST_SPEC})
    drop(inbox, "pointer", {"prompt": "p", "image": "nowhere.png", **FAST_SPEC})
    before = tree_digest(inbox)
    start_watcher(inbox, outbox, orphan_seconds=3.0)

    expected = {"lonely": ("missing_spec", "spec", "lonely.png: no lonely.json beside it"),
                "lost": ("missing_image", "image", "lost.json: no image beside it"),
                "pointer": ("missing_image", "image", 'pointer.json: its "image" names nowhere.png')}
    for stem, (error, field, words) in expected.items():
        path = outbox / f"{stem}.error.json"
        report = wait_for(lambda path=path: path.exists() and json.loads(path.read_text()), timeout=120,
                          what=f"error file for {stem}")
        assert (report["error"], report["problems"][0]["field"]) == (error, field), report
        assert words in report["message"] and "when it arrives" in report["problems"][0]["fix"], report
    assert tree_digest(inbox) == before, "a half drop is reported, never touched"

    drop(inbox, "lonely", {"prompt": "p", **FAST_SPEC})  # the user adds the missing JSON
    wait_for((outbox / "lonely.json").exists, what="the video once the JSON arrives")
    wait_for(lambda: not (outbox / "lonely.error.json").exists(), what="the missing_spec report removed")
    assert probe_mp4(outbox / "lonely.mp4").frames == 8


def test_restart_and_second_watcher_create_no_second_run(start_watcher, tmp_path: Path) -> None:
    inbox, outbox, state = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "state"
    drop(inbox, "lamp", {"prompt": "light flickers", **FAST_SPEC}, png_bytes(color=(9, 9, 200)))
    first = start_watcher(inbox, outbox, state)
    sidecar = _sidecar(outbox, "lamp")
    first.stop()

    # A restart on the same ledger, a second watcher with its own ledger, and a duplicate
    # watchdog storm (touching nothing but re-writing identical bytes elsewhere).
    restarted = start_watcher(inbox, outbox, state)
    second = start_watcher(inbox, outbox, tmp_path / "other-state")
    (inbox / "unrelated.txt").write_text("noise")
    wait_for_scans(restarted.watcher, second.watcher)  # each has seen the settled pair and acted on it
    runs = flow_runs_named([f"lamp-{sidecar['job_id'][:6]}"])
    assert len(runs) == 1, [r.id for r in runs]
    assert json.loads((outbox / "lamp.json").read_text())["prefect"]["flow_run_id"] == str(runs[0].id)


def test_jobs_share_one_warm_model(start_watcher, tmp_path: Path) -> None:
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    for index in range(5):
        drop(inbox, f"item-{index}", {"prompt": f"item {index} turning", **FAST_SPEC},
             png_bytes(color=(index * 40, 100, 100)))
    start_watcher(inbox, outbox)
    engines = [_sidecar(outbox, f"item-{index}")["engine"] for index in range(5)]
    assert len({engine["pid"] for engine in engines}) == 1, "one GPU worker process served all jobs"
    assert {engine["model_loads_in_process"] for engine in engines} == {1}, "5 jobs, one model load"
