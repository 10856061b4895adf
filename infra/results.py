"""Prefect's local result storage, kept bounded.

Why: a render hands its frames back to the flow through Prefect result storage, and its task
parameters (the dropped image) travel the same way. Prefect never deletes those files, so a GPU
host filled its disk at the rate it rendered: ~17 MB per 512x512x16 video, about 10 GB an hour
at full speed. A file is needed for minutes (parameters until the render starts, frames until
the flow has read them) and never after the flow's render timeout, so each GPU worker deletes
files older than ``I2VFLOW_RESULT_TTL_SECONDS``. With a shared bucket as result storage (several
hosts), give the bucket a lifecycle rule instead (docs/operations.md).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import structlog

log = structlog.get_logger("i2vflow.results")


# Prefect writes results and task parameters alike as a JSON ResultRecord, metadata first.
RECORD_START = b'{"metadata":'


def prune_results(root: Path, older_than_seconds: float, now: float | None = None) -> tuple[int, int]:
    """Delete Prefect result records under ``root`` last written more than ``older_than_seconds`` ago.

    Returns (files deleted, bytes freed). Only result records are deleted, so a storage path
    pointed at a folder that holds anything else loses nothing else. Files that vanish meanwhile
    (another GPU worker on the same host pruning too) are skipped.
    """
    cutoff = (time.time() if now is None else now) - older_than_seconds
    deleted = freed = 0
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            try:
                info = path.stat()
                if info.st_mtime < cutoff and _is_result_record(path):
                    path.unlink()
                    deleted, freed = deleted + 1, freed + info.st_size
            except FileNotFoundError:
                continue
    return deleted, freed


def _is_result_record(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(RECORD_START)) == RECORD_START


class ResultPruner(threading.Thread):
    """Prunes ``root`` every ``interval`` seconds until stopped; never raises."""

    def __init__(self, root: Path, ttl_seconds: float, interval: float) -> None:
        super().__init__(name="result-pruner", daemon=True)
        self.root, self.ttl_seconds, self.interval = root, ttl_seconds, interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                deleted, freed = prune_results(self.root, self.ttl_seconds)
                if deleted:
                    log.info("results.pruned", files=deleted, bytes=freed, older_than_seconds=self.ttl_seconds)
            except OSError as exc:  # an unreadable folder must not stop the worker
                log.warning("results.prune_failed", root=str(self.root), error=repr(exc)[:300])
            self.stopped.wait(self.interval)

    def stop(self) -> None:
        self.stopped.set()


def start_result_pruner(ttl_seconds: float) -> ResultPruner | None:
    """A running pruner over this process's local result storage; None when results go to a
    storage block (a bucket shared by hosts), which its own lifecycle rules keep bounded."""
    from prefect.settings import get_current_settings

    results = get_current_settings().results
    if results.default_storage_block:
        log.info("results.not_pruned", reason="results go to a storage block", block=results.default_storage_block)
        return None
    pruner = ResultPruner(Path(results.local_storage_path), ttl_seconds, interval=min(ttl_seconds / 4, 600.0))
    pruner.start()
    return pruner
