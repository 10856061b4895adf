"""An operator cancels a running job from Prefect (the UI's Cancel button sets Cancelling): the run
ends Cancelled, the process it ran in is gone, and no video appears. Flow runs are forks of the
fork server, so this checks Prefect's cancellation reaches them through the command's process."""

from __future__ import annotations

import time
from pathlib import Path

import psutil

from tests.helpers import drop, png_bytes, render_task_run, wait_for


def test_a_run_cancelled_from_prefect_ends_cancelled_and_takes_its_process(service, start_watcher,
                                                                          tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.states import Cancelling

    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    slow = {"prompt": "an operator changes their mind", "num_frames": 24, "steps": 60, "width": 128, "height": 128}
    drop(inbox, "cancel-me", slow, png_bytes(color=(10, 200, 90)))
    handle = start_watcher(inbox, outbox)
    forkserver = psutil.Process(service.supervisor.children["flow-forkserver"].pid)

    def running_run() -> str | None:
        records = handle.watcher.ledger.in_state("submitted")
        run_id = next((r.flow_run_id for r in records if r.ticket.stem == "cancel-me" and r.flow_run_id), None)
        if run_id is None:
            return None
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
        return run_id if state and state.is_running() and _rendering(run_id) else None

    run_id = wait_for(running_run, timeout=120, interval=0.2, what="the job's run rendering")
    forked = forkserver.children()
    assert forked, "the running flow run is a fork of the fork server"
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Cancelling(message="cancelled by the operator"), force=True)
    wait_for(lambda: _state(run_id).is_cancelled(), timeout=90, interval=0.5, what="the run Cancelled")
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in forked),
             timeout=30, what="the run's process gone")
    wait_for(lambda: _render_ended(run_id), timeout=180, what="the orphaned render to end")
    time.sleep(2)  # a live flow would publish within this
    assert not (outbox / "cancel-me.mp4").exists() and _state(run_id).is_cancelled()


def _rendering(run_id: str) -> bool:
    try:
        return render_task_run(run_id) is not None
    except ValueError:  # no render task run yet
        return False


def _render_ended(run_id: str) -> bool:
    # Prefect 3.9 may return a just-deferred task run before its first state is recorded.
    state = render_task_run(run_id).state
    return state is not None and state.is_final()


def _state(run_id: str):  # noqa: ANN202 - a Prefect State
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state
