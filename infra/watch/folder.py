"""Folder hints: watchdog events that wake the scanner early.

Why only hints: inotify misses files copied into brand-new subfolders, doubles Created events
and drops events on overflow. So an event never creates a job; it only makes the
next rescan come sooner. The rescan is the truth. One event says more than "look": a file
closed after writing, or renamed into place, is finished, so ``on_written`` is told its key
and the watcher may take that exact version as settled without a second look (a file copied
into a new subfolder, which gets no such event, still settles by two looks).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver


class _Wake(FileSystemEventHandler):
    def __init__(self, root: Path, wake: threading.Event, on_written: Callable[[str], None] | None) -> None:
        self._root = root
        self._wake = wake
        self._on_written = on_written

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Reads (the watcher hashing a pair, a flow loading its inputs) change nothing; waking
        # on them would spend the look that a drop arriving just then needs.
        if event.event_type in ("opened", "closed_no_write"):
            return
        try:
            self._report_finished(event)
        finally:  # after the report, so the look it brings sees it; and even if the report failed
            self._wake.set()

    def _report_finished(self, event: FileSystemEvent) -> None:
        path = {"closed": event.src_path, "moved": event.dest_path}.get(event.event_type)
        key = _key(self._root, path) if path and not event.is_directory else None
        if key is not None and self._on_written is not None:
            self._on_written(key)


def _key(root: Path, path: str | bytes) -> str | None:
    try:
        return Path(os.fsdecode(path)).relative_to(root).as_posix()
    except ValueError:  # moved out of the tree
        return None


def start_folder_hints(root: Path, wake: threading.Event,
                       on_written: Callable[[str], None] | None = None) -> BaseObserver:
    """Start a recursive watchdog observer on ``root`` that sets ``wake`` on changes and calls
    ``on_written(key)`` for each file closed after writing or renamed into place."""
    root.mkdir(parents=True, exist_ok=True)
    observer = Observer()
    observer.schedule(_Wake(root, wake, on_written), str(root), recursive=True)
    observer.daemon = True
    observer.start()
    return observer
