"""Folder hints: watchdog events that wake the scanner early.

Why only hints: inotify misses files copied into brand-new subfolders, doubles Created events
and drops events on overflow (FIELD-NOTES). So an event never creates a job; it only makes the
next rescan come sooner. The rescan is the truth.
"""

from __future__ import annotations

import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver


class _Wake(FileSystemEventHandler):
    def __init__(self, wake: threading.Event) -> None:
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Reads (the watcher hashing a pair, a flow loading its inputs) change nothing; waking
        # on them would spend the look that a drop arriving just then needs.
        if event.event_type not in ("opened", "closed_no_write"):
            self._wake.set()


def start_folder_hints(root: Path, wake: threading.Event) -> BaseObserver:
    """Start a recursive watchdog observer on ``root`` that sets ``wake`` on changes."""
    root.mkdir(parents=True, exist_ok=True)
    observer = Observer()
    observer.schedule(_Wake(wake), str(root), recursive=True)
    observer.daemon = True
    observer.start()
    return observer
