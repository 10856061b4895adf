"""Wire a Watcher from the settings: store, ledger, hints, Prefect submission.

Why a factory: the CLI, the tests and a fleet deployment build the same watcher the same way;
only the environment differs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from infra.jobs import JobTicket, RenderHandover
from infra.ledger import Ledger
from infra.logging import configure_logging
from infra.orchestrator import (
    RunSubmitter,
    cancel_task_run,
    emit_job_event,
    read_run_states,
    reschedule_run,
    wait_for_task_run_start,
)
from infra.settings import Settings, get_settings
from infra.store import Store, StoreError, open_store, s3_credentials
from infra.store.bucket import BucketStore, make_client
from infra.watch.bucket import ListenHints
from infra.watch.folder import start_folder_hints
from infra.watch.reconcile import Finding, findings_markdown, reconcile
from infra.watch.service import Watcher
from infra.watch.webhook import WebhookServer

log = structlog.get_logger("i2vflow.watcher")


def _location(raw: str) -> str:
    """Folders become absolute paths: the flow may run from another working directory."""
    return raw if raw.startswith("s3://") else str(Path(raw).resolve())


HandOver = Callable[[JobTicket, Settings, Any], RenderHandover | None]  # the last: the watcher's API client


def build_watcher(settings: Settings | None = None,
                  hand_over: HandOver | None = None) -> tuple[Watcher, Callable[[], None]]:
    """A ready watcher and a function that releases what it holds. ``hand_over`` (the CLI passes
    ``flows.generate.hand_over_render``; infra imports no flows) starts a job's render as its run
    is submitted, where ``early_render`` is on."""
    settings = settings or get_settings()
    configure_logging(settings.resolved_log_file)
    inbox_location, outbox_location = _location(settings.inbox), _location(settings.outbox)
    inbox = open_store(inbox_location, settings)
    outbox = open_store(outbox_location, settings)  # fails early on a wrong outbox
    ledger = Ledger(settings.ledger_path)
    kind = "bucket" if inbox_location.startswith("s3://") else "folder"

    submitter = RunSubmitter(settings.deployment)
    early = hand_over if settings.early_render else None
    head_start = RenderHeadStart(settings.render_head_start_seconds)

    def submit(ticket: JobTicket, model: str) -> str:
        return _submit(submitter, ticket, kind, model, early, settings, head_start)

    def notify(event: str, ticket: JobTicket) -> None:
        emit_job_event(event, ticket)

    # A bucket is listed every poll_seconds (a listing costs a request per 1,000 objects).
    watch_settings = settings if kind == "folder" else settings.model_copy(
        update={"rescan_seconds": settings.poll_seconds})
    watcher = Watcher(watch_settings, inbox, inbox_location, outbox_location, ledger, submit, notify, kind)
    closers: list[Callable[[], None]] = [ledger.close, submitter.close]
    hints: list[object] = []
    if kind == "folder":
        observer = start_folder_hints(Path(inbox_location), watcher.wake, watcher.vouch)
        closers.insert(0, lambda: (observer.stop(), observer.join(5)))
        hints.append(observer)
    else:
        assert isinstance(inbox, BucketStore)
        for source, stop in _start_bucket_hints(settings, inbox, watcher):
            closers.insert(0, stop)
            hints.append(source)
    watcher.reconcile = lambda: _reconcile(ledger, outbox, settings.max_reschedules)
    watcher.server_back = _server_probe()
    watcher.hint_sources = hints
    log.info(
        "watcher.started", inbox=inbox.describe(), outbox=outbox_location, source=kind,
        model=settings.model, rescan_seconds=watch_settings.rescan_seconds)
    lock = threading.Lock()

    def close() -> None:
        with lock:
            while closers:
                closers.pop(0)()

    return watcher, close


class RenderHeadStart:
    """Lets a handed-over render start before its flow run is created.

    Why: on SQLite the server takes one write at a time, and a render's start writes (its ``gpu``
    concurrency slot). Created at once, the flow run (a write transaction of 50-110 ms under load)
    and its claim queued that start by 35-110 ms on an H100 host. The flow run awaits a render of
    seconds, so creating it ~0.1 s later costs nothing. While renders queue (one found untaken),
    there is nothing to let start, and runs are created at once."""

    QUEUE_MEMORY_S = 10.0

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._queue_seen_at = float("-inf")

    def give(self, client: Any, task_run_id: str, job_id: str) -> None:
        if self.limit <= 0 or time.monotonic() - self._queue_seen_at < self.QUEUE_MEMORY_S:
            return
        started = time.monotonic()
        try:
            state = wait_for_task_run_start(client, task_run_id, self.limit)
        except Exception as exc:  # the run's creation will meet the same server; it decides
            log.warning("render.head_start_failed", job_id=job_id, error=repr(exc)[:300])
            return
        if state == "SCHEDULED":
            self._queue_seen_at = time.monotonic()
        log.debug("render.head_start", job_id=job_id, render_state=state,
                  waited_s=round(time.monotonic() - started, 3))


def _submit(submitter: RunSubmitter, ticket: JobTicket, kind: str, model: str,
            hand_over: HandOver | None, settings: Settings, head_start: RenderHeadStart | None = None) -> str:
    """Hand the render over (if asked), let it start, then create the flow run that awaits it.
    The render is keyed by the job: a restart or another watcher hands over the same one, and so
    does this watcher's next try where the run could not be created now (the render is kept for
    it). Only a run that awaits no hand-over (made by a watcher with ``early_render`` off) leaves
    it unawaited: then it is cancelled."""
    handover = None
    if hand_over is not None:
        try:
            handover = hand_over(ticket, settings, submitter.client())
        except Exception as exc:  # the flow submits the render itself
            log.warning("render.handover_failed", job_id=ticket.job_id, error=repr(exc)[:500])
    if handover is not None and head_start is not None:
        head_start.give(submitter.client(), handover.task_run_id, ticket.job_id)
    flow_run_id, awaited = submitter.submit(ticket, kind, model, handover)
    if handover is not None and awaited != handover.task_run_id:
        cancel_task_run(handover.task_run_id, f"the job's flow run {flow_run_id} awaits no hand-over")
    return flow_run_id


def _server_probe() -> Callable[[], bool] | None:
    """GET /health of the Prefect API this process submits to (None: no server URL set)."""
    from prefect.settings import PREFECT_API_URL

    from infra.service import api_healthy

    url = PREFECT_API_URL.value()
    return (lambda: api_healthy(url, timeout=1.0)) if url else None


def _reconcile(ledger: Ledger, outbox: Store, max_attempts: int) -> list[Finding]:
    findings = reconcile(ledger, outbox, read_run_states, reschedule_run, max_attempts)
    if findings:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key="i2vflow-reconciler", markdown=findings_markdown(findings),
                                 description="What the i2vflow reconciler found and repaired")
    return findings


def _start_bucket_hints(settings: Settings, inbox: BucketStore,
                        watcher: Watcher) -> list[tuple[object, Callable[[], None]]]:
    """MinIO's listen stream (it finds out itself whether the server has one) and, when
    ``webhook_port`` is set, the webhook receiver. Both set ``watcher.wake`` and vouch for the
    objects their events say were created."""
    access_key, secret_key = s3_credentials(settings)
    # Its own client: a read timeout longer than the 10 s keep-alive, and no retries of its own.
    client = make_client(settings.s3_endpoint, access_key, secret_key, secure=settings.s3_secure,
                         region=settings.s3_region, read_timeout=35.0, retries=0)
    listen = ListenHints(client, inbox.bucket, inbox.prefix, watcher.wake, on_written=watcher.vouch)
    listen.start()
    started: list[tuple[object, Callable[[], None]]] = [(listen, listen.stop)]
    if settings.webhook_port:
        token = settings.webhook_token.get_secret_value() if settings.webhook_token else ""
        if not token:
            listen.stop()
            raise StoreError("I2VFLOW_WEBHOOK_PORT is set but I2VFLOW_WEBHOOK_TOKEN is not: "
                             "the webhook refuses to run unguarded")
        hook = WebhookServer(watcher.wake, token, host=settings.webhook_host, port=settings.webhook_port,
                             bucket=inbox.bucket, prefix=inbox.prefix, on_written=watcher.vouch).start()
        started.append((hook, hook.stop))
    return started
