"""The watcher hands a job's render to the GPU worker as it submits the job (``early_render``),
and the flow awaits that render instead of submitting its own after its validation.

What must hold: one render per job (a second watcher gets the same render back), the flow run
and the sidecar name the render it used, and the flow still renders by itself where the
handed-over render ended without a video or is not the job it validated.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

from infra.engine.video import probe_mp4
from infra.jobs import JobTicket, RenderHandover
from infra.settings import Settings
from tasks.inputs import prepare_job
from tests.helpers import FAST_SPEC, drop, png_bytes, structlog_events_in_prefect, wait_for, wait_for_scans


def _sidecar(outbox: Path, stem: str) -> dict[str, Any]:
    path = outbox / f"{stem}.json"
    wait_for(path.exists, timeout=180, what=f"sidecar {path}")
    return json.loads(path.read_text())


def _flow_run(flow_run_id: str) -> Any:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _task_run(task_run_id: str) -> Any:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_task_run(task_run_id)


def _renders_named(stem: str, since: datetime) -> list[Any]:
    """Every render-video task run for ``stem`` created since ``since``: handed over or the flow's own."""
    from prefect import get_client
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=200)
    return [run for run in runs if run.created >= since and (
        run.name == f"render-video-{stem}" or (run.name.startswith("render-video") and run.flow_run_id is not None
                                               and _flow_run(str(run.flow_run_id)).name.startswith(f"{stem}-")))]


def _unqueued_render(state: Any) -> str:
    """A real render-video task run that no GPU worker will take (not deferred): a render that
    was lost, or one prepared for another job."""
    from prefect import get_client

    from tasks.render import render_video

    with get_client(sync_client=True) as client:
        return str(client.create_task_run(task=render_video, flow_run_id=None, dynamic_key=uuid4().hex,
                                          name="render-video-stand-in", state=state).id)


def test_the_flow_awaits_the_render_the_watcher_handed_over(start_watcher, tmp_path: Path) -> None:
    inbox, outbox, since = tmp_path / "inbox", tmp_path / "outbox", datetime.now(UTC)
    drop(inbox, "kite", {"prompt": "a kite on a windy beach", **FAST_SPEC}, png_bytes(color=(30, 90, 200)))
    first = start_watcher(inbox, outbox, tmp_path / "state")
    sidecar = _sidecar(outbox, "kite")
    run = _flow_run(sidecar["prefect"]["flow_run_id"])
    handover = run.parameters["handover"]
    render = _task_run(handover["task_run_id"])

    assert sidecar["prefect"]["render_task_run_id"] == handover["task_run_id"]
    assert sidecar["prefect"]["render_task_run_url"].endswith(f"/runs/task-run/{handover['task_run_id']}")
    assert render.flow_run_id is None and render.state.is_completed()
    assert render.created < run.created  # handed over before the flow run existed
    assert probe_mp4(outbox / "kite.mp4").frames == FAST_SPEC["num_frames"]
    # Its logs are its own task run's; the flow run's logs name it.
    structlog_events_in_prefect(str(run.id), handover["task_run_id"])

    # A second watcher with a ledger of its own (and this one restarted) find the job again:
    # the same render and the same flow run come back, nothing renders twice.
    first.stop()
    second = start_watcher(inbox, outbox, tmp_path / "other-state")
    restarted = start_watcher(inbox, outbox, tmp_path / "state")
    wait_for_scans(second.watcher, restarted.watcher)
    assert second.watcher.ledger.get(sidecar["job_id"]).flow_run_id == str(run.id)
    assert [r.id for r in _renders_named("kite", since)] == [render.id]


def test_with_early_render_off_the_flow_submits_the_render_itself(start_watcher, tmp_path: Path) -> None:
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    drop(inbox, "late", {"prompt": "the flow's own render", **FAST_SPEC}, png_bytes(color=(200, 200, 30)))
    start_watcher(inbox, outbox, early_render=False)
    sidecar = _sidecar(outbox, "late")
    run = _flow_run(sidecar["prefect"]["flow_run_id"])
    assert "handover" not in run.parameters
    assert str(_task_run(sidecar["prefect"]["render_task_run_id"]).flow_run_id) == str(run.id)  # nested in the run
    structlog_events_in_prefect(str(run.id))  # render.done among the flow run's own logs


def test_a_hand_over_for_a_run_that_awaits_none_is_cancelled(start_watcher, tmp_path: Path) -> None:
    from prefect.states import Scheduled

    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    drop(inbox, "mixed", {"prompt": "two watchers, two settings", **FAST_SPEC}, png_bytes(color=(90, 20, 160)))
    first = start_watcher(inbox, outbox, tmp_path / "state", early_render=False)
    sidecar = _sidecar(outbox, "mixed")
    first.stop()
    handed: list[str] = []

    def hand_over_unqueued(ticket: JobTicket, settings: Settings, client: object) -> RenderHandover | None:
        handed.append(_unqueued_render(Scheduled()))  # no GPU worker takes it: the outcome is the watcher's
        return RenderHandover(task_run_id=handed[0], job_digest=prepare_job(ticket, settings).digest())

    second = start_watcher(inbox, outbox, tmp_path / "other-state", hand_over=hand_over_unqueued)
    wait_for_scans(second.watcher)
    assert second.watcher.ledger.get(sidecar["job_id"]).flow_run_id == sidecar["prefect"]["flow_run_id"]
    wait_for(lambda: _task_run(handed[0]).state.is_cancelled(), timeout=30, what="the unawaited hand-over cancelled")


def test_bad_input_is_not_handed_over(start_watcher, tmp_path: Path) -> None:
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    drop(inbox, "wrong", {"prompt": "p", "steps": -3}, png_bytes())
    start_watcher(inbox, outbox)
    report = outbox / "wrong.error.json"
    wait_for(report.exists, timeout=120, what="the error report")
    flow_run_id = json.loads(report.read_text())["flow_run_id"]
    assert "handover" not in _flow_run(flow_run_id).parameters


def test_a_lost_handover_is_rendered_by_the_flow(start_watcher, tmp_path: Path) -> None:
    from prefect.states import Crashed

    inbox, outbox, since = tmp_path / "inbox", tmp_path / "outbox", datetime.now(UTC)
    lost: list[str] = []

    def hand_over_a_lost_render(ticket: JobTicket, settings: Settings, client: object) -> RenderHandover | None:
        lost.append(_unqueued_render(Crashed(message="GPU worker lost")))
        return RenderHandover(task_run_id=lost[0], job_digest=prepare_job(ticket, settings).digest())

    drop(inbox, "lost", {"prompt": "a crashed render", **FAST_SPEC}, png_bytes(color=(120, 20, 20)))
    start_watcher(inbox, outbox, hand_over=hand_over_a_lost_render)
    sidecar = _sidecar(outbox, "lost")
    own = _task_run(sidecar["prefect"]["render_task_run_id"])
    assert own.flow_run_id is not None and str(own.flow_run_id) == sidecar["prefect"]["flow_run_id"]
    assert own.state.is_completed() and _task_run(lost[0]).state.is_crashed()
    assert probe_mp4(outbox / "lost.mp4").frames == FAST_SPEC["num_frames"]
    assert [r.id for r in _renders_named("lost", since)] == [own.id]


def test_a_handover_of_another_job_is_cancelled_and_the_flow_renders_its_own(start_watcher, tmp_path: Path) -> None:
    from prefect.states import Scheduled

    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    stranger: list[str] = []

    def hand_over_another_job(ticket: JobTicket, settings: Settings, client: object) -> RenderHandover | None:
        stranger.append(_unqueued_render(Scheduled()))
        return RenderHandover(task_run_id=stranger[0], job_digest="0" * 64)  # validated other settings

    drop(inbox, "other", {"prompt": "not what the watcher saw", **FAST_SPEC}, png_bytes(color=(20, 120, 20)))
    start_watcher(inbox, outbox, hand_over=hand_over_another_job)
    sidecar = _sidecar(outbox, "other")
    assert sidecar["prefect"]["render_task_run_id"] != stranger[0]
    wait_for(lambda: _task_run(stranger[0]).state.is_cancelled(), timeout=30, what="the stranger cancelled")
    assert probe_mp4(outbox / "other.mp4").frames == FAST_SPEC["num_frames"]

