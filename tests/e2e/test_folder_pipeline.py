"""Drop files into a watched folder, get videos: the whole path on the real stack."""

from __future__ import annotations

import json
from pathlib import Path

from infra.engine.video import probe_mp4
from tests.helpers import FAST_SPEC, drop, png_bytes, tree_digest, wait_for


def _flow_runs_of(job_names: list[str]) -> list[object]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=job_names)))


def test_drop_gives_video_and_sidecar(start_watcher, tmp_path: Path) -> None:
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    drop(inbox, "shoe", {"prompt": "product rotating slowly under studio light", **FAST_SPEC}, png_bytes())
    before = tree_digest(inbox)
    start_watcher(inbox, outbox)

    sidecar_path = wait_for(lambda: (outbox / "shoe.json").exists() and outbox / "shoe.json", what="sidecar")
    sidecar = json.loads(sidecar_path.read_text())
    video = probe_mp4(outbox / "shoe.mp4")
    assert (video.frames, video.width, video.height) == (8, 64, 64)
    assert round(video.fps) == 8
    assert sidecar["frames"] == 8 and sidecar["model"]["is_noise"] is True
    assert "noise" in sidecar["model"]["warning"]
    assert sidecar["prefect"]["flow_run_id"]
    assert tree_digest(inbox) == before, "inputs must never be modified"
    runs = _flow_runs_of([f"shoe-{sidecar['job_id'][:6]}"])
    assert len(runs) == 1 and str(runs[0].id) == sidecar["prefect"]["flow_run_id"]
