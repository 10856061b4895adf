"""A GPU worker holds a staged render, so the GPU does not wait for Prefect between jobs.

Why: between two renders Prefect persists the first result, releases its slot, reads the next
task run's parameters and moves it to Running (~0.4 s per video on an H200 host, 7% of a
512x16 render). With two slots the next render is already Running, waiting on the engine's
lock, when the first leaves the GPU. Real server, real GPU task worker (tiny model), real drops.
"""

from __future__ import annotations

import json
from pathlib import Path

from infra.engine.video import probe_mp4
from tests.helpers import drop, png_bytes, render_task_run, wait_for

# The first job renders long enough on a CPU (~15 s) that the later jobs, dropped once it is on the
# model, reach the worker mid-render however slowly their flow processes start on a busy 2-core box.
LONG_SPEC = {"prompt": "camera slowly zooming in, clouds moving", "num_frames": 32, "steps": 80}
SLOW_SPEC = {"prompt": "camera slowly zooming in, clouds moving", "num_frames": 16, "steps": 40}


def _sidecar(path: Path) -> dict:
    wait_for(path.exists, timeout=300, what=str(path))
    return json.loads(path.read_text())


def _a_render_is_running() -> bool:
    from prefect import get_client
    from prefect.client.schemas.filters import (
        TaskRunFilter,
        TaskRunFilterName,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    running = TaskRunFilter(name=TaskRunFilterName(like_="render-video"),
                            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING])))
    with get_client(sync_client=True) as client:
        return bool(client.read_task_runs(task_run_filter=running))


def test_the_next_render_is_staged_while_the_gpu_renders_and_never_shares_it(start_watcher, tmp_path: Path) -> None:
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    stems = [f"staged-{index}" for index in range(3)]
    drop(inbox, stems[0], LONG_SPEC, png_bytes(color=(0, 90, 160)))
    start_watcher(inbox, outbox)
    wait_for(_a_render_is_running, timeout=120, interval=0.2, what="the first render to start")
    for index, stem in enumerate(stems[1:], start=1):
        drop(inbox, stem, SLOW_SPEC, png_bytes(color=(40 * index, 90, 160)))

    sidecars = [_sidecar(outbox / f"{stem}.json") for stem in stems]
    assert [probe_mp4(outbox / f"{stem}.mp4").frames for stem in stems] == [32, 16, 16]
    assert len({s["engine"]["pid"] for s in sidecars}) == 1, "one GPU worker rendered all three"

    renders = sorted(((render_task_run(s["prefect"]["flow_run_id"]), s["timings_seconds"]) for s in sidecars),
                     key=lambda pair: pair[0].end_time)
    for (earlier, _), (later, timings) in zip(renders, renders[1:], strict=False):
        # One on the model at a time: the later render began on the model after the earlier ended.
        on_model_from = later.end_time.timestamp() - timings["render_on_model"]
        assert on_model_from >= earlier.end_time.timestamp() - 0.25, "two renders shared the model"
    staged = [(run, timings) for run, timings in renders[1:] if run.start_time < renders[0][0].end_time]
    assert staged, "no render was Running (staged) while the first was still on the GPU"
    assert all(timings["waiting_for_gpu"] > 0.5 for _, timings in staged), staged
