"""Prefect's process worker, woken by the server's events instead of waiting for its next poll.

Why: a process worker asks its pool for scheduled flow runs every ``PREFECT_WORKER_QUERY_SECONDS``
(1 s here), so a lone job waited half of that on average before its flow run started. The server
announces every flow run that enters Scheduled on its event stream (``prefect.flow-run.Scheduled``,
related to the run's work pool), within milliseconds of creating it; this worker asks for its
pool's scheduled runs the moment one arrives. It only wakes Prefect's own poll early: the poll
keeps its interval and catches whatever the stream missed (a reconnect, a run scheduled for later),
and claiming a run stays Prefect's (the Pending proposal), so several workers on one pool still
start each flow run once.

Run as ``python -m infra.flowworker POOL`` (``i2vflow flow-worker`` and ``i2vflow up`` do);
``I2VFLOW_FLOW_WORKER_EVENTS=false`` leaves it polling only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

import anyio
import structlog
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter
from prefect.events.schemas.events import ResourceSpecification
from prefect.settings import PREFECT_WORKER_HEARTBEAT_SECONDS, PREFECT_WORKER_PREFETCH_SECONDS
from prefect.utilities.processutils import setup_signal_handlers_worker
from prefect.workers.process import ProcessWorker

from infra.logging import configure_logging
from infra.settings import get_settings

SCHEDULED_EVENT = "prefect.flow-run.Scheduled"
RECONNECT_SECONDS = 5.0
log = structlog.get_logger("i2vflow.flowworker")


def scheduled_in_pool(work_pool: str) -> EventFilter:
    """Events of flow runs entering Scheduled in ``work_pool``."""
    pool = ResourceSpecification({"prefect.resource.role": "work-pool", "prefect.resource.name": work_pool})
    return EventFilter(event=EventNameFilter(name=[SCHEDULED_EVENT]), related=EventRelatedFilter(labels=pool))


async def wake_on_scheduled(worker: ProcessWorker, work_pool: str) -> None:
    """Poll ``worker``'s pool each time the server schedules a flow run in it, for ever.

    A lost stream is reopened after a pause; meanwhile the worker's own poll carries on.
    """
    while True:
        try:
            async with get_events_subscriber(filter=scheduled_in_pool(work_pool)) as events:
                log.info("flow_worker.listening", work_pool=work_pool, event_name=SCHEDULED_EVENT)
                await worker.get_and_submit_flow_runs()  # what was scheduled while the stream was closed
                async for _ in events:
                    # Runs the worker has already taken are skipped by Prefect's own bookkeeping.
                    await worker.get_and_submit_flow_runs()
        except Exception as exc:  # noqa: BLE001 - the poll still runs; only the early wake is lost
            reason = f"{type(exc).__name__}: {exc}"[:300]
        else:
            reason = "the server closed the stream"
        log.warning("flow_worker.event_stream_lost", reason=reason, polling_only_for_s=RECONNECT_SECONDS)
        await asyncio.sleep(RECONNECT_SECONDS)


async def run_worker(work_pool: str) -> None:
    """Run a process worker of ``work_pool`` and its event wake-up until the worker stops."""
    worker = ProcessWorker(
        work_pool_name=work_pool,
        prefetch_seconds=PREFECT_WORKER_PREFETCH_SECONDS.value(),
        heartbeat_interval_seconds=int(PREFECT_WORKER_HEARTBEAT_SECONDS.value()),
    )
    async with anyio.create_task_group() as group:
        if get_settings().flow_worker_events:
            group.start_soon(wake_on_scheduled, worker, work_pool)
        await worker.start(printer=print)
        group.cancel_scope.cancel()


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python -m infra.flowworker WORK_POOL")
    configure_logging(get_settings().resolved_log_file)
    setup_signal_handlers_worker(os.getpid(), "the i2vflow flow worker", print)
    with contextlib.suppress(KeyboardInterrupt):  # SIGTERM and SIGINT end the worker as Prefect's does
        asyncio.run(run_worker(argv[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
