"""The watcher's line to the Prefect server: waiting for a handed-over render to start."""

from __future__ import annotations

import threading
import time
from uuid import UUID, uuid4

from infra.orchestrator import wait_for_task_run_start


def _render_task_run(client: object, state: object) -> str:
    """A real render-video task run in ``state`` that no GPU worker will take."""
    from tasks.render import render_video

    return str(client.create_task_run(task=render_video, flow_run_id=None, dynamic_key=uuid4().hex,  # type: ignore[attr-defined]
                                      name="render-video-head-start", state=state).id)


def test_it_returns_once_a_worker_has_started_the_render(prefect_api: str) -> None:
    from prefect import get_client
    from prefect.states import Pending, Running, Scheduled

    with get_client(sync_client=True) as client:
        task_run_id = _render_task_run(client, Scheduled())

        def a_gpu_worker_takes_it() -> None:
            with get_client(sync_client=True) as worker:
                time.sleep(0.05)
                worker.set_task_run_state(UUID(task_run_id), Pending(), force=True)
                time.sleep(0.3)  # longer than a render nobody takes is waited for: Pending is taken
                worker.set_task_run_state(UUID(task_run_id), Running(), force=True)

        worker = threading.Thread(target=a_gpu_worker_takes_it)
        started = time.monotonic()
        worker.start()
        state = wait_for_task_run_start(client, task_run_id, limit=10.0, unclaimed_after=0.15)
        waited = time.monotonic() - started
        worker.join()
    assert state == "RUNNING"
    assert 0.35 <= waited < 5.0, waited


def test_it_does_not_wait_for_a_render_no_worker_takes_or_one_that_ended(prefect_api: str) -> None:
    from prefect import get_client
    from prefect.states import Completed, Scheduled

    with get_client(sync_client=True) as client:
        queued = _render_task_run(client, Scheduled())
        started = time.monotonic()
        assert wait_for_task_run_start(client, queued, limit=10.0, unclaimed_after=0.2) == "SCHEDULED"
        assert 0.2 <= time.monotonic() - started < 5.0

        done = _render_task_run(client, Completed())
        started = time.monotonic()
        assert wait_for_task_run_start(client, done, limit=10.0) == "COMPLETED"
        assert time.monotonic() - started < 5.0
