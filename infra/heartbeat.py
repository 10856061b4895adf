"""GPU-worker heartbeats, so a flow can tell a slow render from one whose worker died.

Why: a task worker killed mid-render leaves its task run Running forever; the flow waiting on
it would sit until its timeout while the orphan holds a ``gpu`` concurrency slot. Each GPU
worker publishes, every few seconds, a Prefect Variable ``i2vflow-gpu-<worker>`` naming the
task runs it is executing. A Running render that no fresh heartbeat claims is an orphan: the
flow marks it Crashed (which frees its slot) and submits the render again. Variables live on
the Prefect server, so this works across hosts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

PREFIX = "i2vflow-gpu-"
log = structlog.get_logger("i2vflow.heartbeat")
_running: set[str] = set()
_lock = threading.Lock()


def worker_name() -> str:
    raw = f"{socket.gethostname()}-{os.getpid()}".lower()
    return PREFIX + re.sub(r"[^a-z0-9_-]+", "-", raw)[:200]


@contextmanager
def tracking(task_run_id: str) -> Iterator[None]:
    """Mark a task run as executing in this process for as long as the block runs."""
    with _lock:
        _running.add(task_run_id)
    try:
        yield
    finally:
        with _lock:
            _running.discard(task_run_id)


class HeartbeatPublisher(threading.Thread):
    """Publishes this worker's heartbeat every ``interval`` seconds until stopped."""

    def __init__(self, interval: float = 5.0) -> None:
        super().__init__(name="gpu-heartbeat", daemon=True)
        self.interval = interval
        self.name_on_server = worker_name()
        self.stopped = threading.Event()

    def run(self) -> None:
        from prefect.variables import Variable

        while not self.stopped.is_set():
            with _lock:
                beat = {"at": time.time(), "running": sorted(_running), "pid": os.getpid()}
            try:
                Variable.set(self.name_on_server, json.dumps(beat), overwrite=True)
            except Exception as exc:  # the server may be briefly away; keep beating
                log.warning("heartbeat.failed", error=repr(exc)[:300])
            self.stopped.wait(self.interval)

    def stop(self) -> None:
        self.stopped.set()
        from prefect.variables import Variable

        with contextlib.suppress(Exception):  # best effort on shutdown
            Variable.unset(self.name_on_server)


def claimed_task_runs(stale_after: float) -> set[str]:
    """Task-run ids that some GPU worker reported executing within ``stale_after`` seconds."""
    from prefect import get_client

    claimed: set[str] = set()
    now = time.time()
    with get_client(sync_client=True) as client:
        for variable in client.read_variables():
            if not variable.name.startswith(PREFIX):
                continue
            try:
                beat = json.loads(str(variable.value))
            except ValueError:
                continue
            if now - float(beat.get("at", 0)) <= stale_after:
                claimed.update(beat.get("running", []))
    return claimed
