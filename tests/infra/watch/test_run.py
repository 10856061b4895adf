"""Wiring the watcher: the handed-over render's head start before its flow run is created."""

from __future__ import annotations

import time
from typing import Any
from uuid import uuid4

from infra.watch.run import RenderHeadStart


class CountingClient:
    """A real Prefect client that counts the task-run reads made through it."""

    def __init__(self, client: Any) -> None:
        self.client, self.reads = client, 0

    def read_task_run(self, task_run_id: Any) -> Any:
        self.reads += 1
        return self.client.read_task_run(task_run_id)


def _queued_render(client: Any) -> str:
    from prefect.states import Scheduled

    from tasks.render import render_video

    return str(client.create_task_run(task=render_video, flow_run_id=None, dynamic_key=uuid4().hex,
                                      name="render-video-queued", state=Scheduled()).id)


def test_once_renders_queue_the_next_jobs_get_no_head_start(prefect_api: str) -> None:
    from prefect import get_client

    with get_client(sync_client=True) as real:
        client = CountingClient(real)
        head_start = RenderHeadStart(limit=5.0)
        started = time.monotonic()
        head_start.give(client, _queued_render(real), "job-1")  # no GPU worker takes it: the queue is full
        assert client.reads >= 2 and time.monotonic() - started >= 0.15
        reads = client.reads
        head_start.give(client, _queued_render(real), "job-2")
        assert client.reads == reads  # created at once, without reading the render

        off = RenderHeadStart(limit=0)
        off.give(client, _queued_render(real), "job-3")
        assert client.reads == reads
