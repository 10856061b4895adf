"""Wire a Watcher from the settings: store, ledger, hints, Prefect submission.

Why a factory: the CLI, the tests and a fleet deployment build the same watcher the same way;
only the environment differs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from infra.jobs import JobTicket
from infra.ledger import Ledger
from infra.logging import configure_logging
from infra.orchestrator import emit_job_event, submit_job
from infra.settings import Settings, get_settings
from infra.store import open_store
from infra.watch.folder import start_folder_hints
from infra.watch.service import Watcher


def _location(raw: str) -> str:
    """Folders become absolute paths: the flow may run from another working directory."""
    return raw if raw.startswith("s3://") else str(Path(raw).resolve())


def build_watcher(settings: Settings | None = None) -> tuple[Watcher, Callable[[], None]]:
    """A ready watcher and a function that releases what it holds."""
    settings = settings or get_settings()
    configure_logging(settings.resolved_log_file)
    inbox_location, outbox_location = _location(settings.inbox), _location(settings.outbox)
    inbox = open_store(inbox_location, settings)
    open_store(outbox_location, settings)  # fail early on a wrong outbox
    ledger = Ledger(settings.ledger_path)
    kind = "bucket" if inbox_location.startswith("s3://") else "folder"

    def submit(ticket: JobTicket, model: str) -> str:
        return submit_job(ticket, settings.deployment, kind, model)

    def notify(event: str, ticket: JobTicket) -> None:
        emit_job_event(event, ticket)

    watcher = Watcher(settings, inbox, inbox_location, outbox_location, ledger, submit, notify, kind)
    closers: list[Callable[[], None]] = [ledger.close]
    if kind == "folder":
        observer = start_folder_hints(Path(inbox_location), watcher.wake)
        closers.insert(0, lambda: (observer.stop(), observer.join(5)))
    structlog.get_logger("i2vflow.watcher").info(
        "watcher.started", inbox=inbox.describe(), outbox=outbox_location, source=kind,
        model=settings.model, rescan_seconds=settings.rescan_seconds)
    lock = threading.Lock()

    def close() -> None:
        with lock:
            while closers:
                closers.pop(0)()

    return watcher, close
