"""Bucket hints: MinIO's ListenBucketNotification stream as a fast path; polling stays the truth.

Why only hints: a notification can be lost (stream reconnecting, server restarting, a server
that has no such API), so an event never creates a job; it sets ``wake`` and the watcher lists
the bucket sooner. Listing every ``I2VFLOW_POLL_SECONDS`` finds everything the events miss.

Why this is not ``Minio.listen_bucket_notification``: against a server without the API (AWS S3,
moto, Garage, SeaweedFS, s3rver) that iterator reconnects in a tight loop forever (500+ requests
in 5 s). This module asks once and looks at the answer first:

1. a JSON line (an event, or the ``{"Records":null}`` keep-alive that ``ping=N`` asks for):
   supported; every later line with records sets ``wake``, after telling ``on_written`` the
   key of each object created (an S3 object is whole once it exists, so the watcher may take
   the version it finds as settled without a second look);
2. XML or HTML (moto answers with a bucket listing), a non-JSON line, a 4xx or 501 error, or the
   client refusing (AWS hosts): unsupported; one warning, polling only, the thread ends;
3. a transport failure or 5xx: back off 1, 2, 4 ... 60 s. Before the stream ever worked, give up
   after ``max_failures`` tries (one warning). Once it has worked (a MinIO restart), keep
   retrying at most once per back-off interval: bounded, never tight.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
from minio import Minio
from minio.error import S3Error

log = structlog.get_logger("i2vflow.watch.bucket")

LISTEN_EVENTS = ("s3:ObjectCreated:*", "s3:ObjectRemoved:*")


class ListenUnsupported(Exception):
    """The server does not speak MinIO's ListenBucketNotification."""


class ListenHints(threading.Thread):
    """A daemon thread that turns MinIO bucket events under ``prefix`` into ``wake.set()``.

    ``state`` tells what it is doing: ``probing``, ``listening``, ``backoff``, ``polling-only``
    (gave up; the watcher's polling carries on alone) or ``stopped``. ``requests`` counts the
    listen requests sent, so a test can prove the reconnects are bounded.
    """

    def __init__(self, client: Minio, bucket: str, prefix: str, wake: threading.Event, *,
                 on_written: Callable[[str], None] | None = None, ping_seconds: int = 10,
                 max_failures: int = 5, base_backoff: float = 1.0, max_backoff: float = 60.0) -> None:
        super().__init__(name=f"listen-{bucket}", daemon=True)
        self._client = client
        self._bucket = bucket
        self._prefix = prefix
        self._wake = wake
        self._on_written = on_written
        self._ping = ping_seconds
        self._max_failures = max_failures
        self._base_backoff = base_backoff
        self._max_backoff = max_backoff
        self._stop_event = threading.Event()
        self._response: Any = None
        self.state = "probing"
        self.supported: bool | None = None  # None until the server has answered either way
        self.requests = 0
        self.events = 0
        self.reason = ""

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        failures, delay = 0, self._base_backoff
        while not self._stop_event.is_set():
            self.requests += 1
            started = time.monotonic()
            try:
                self._stream_once()
                error: str = "stream ended"
            except ListenUnsupported as exc:
                self._give_up(f"server does not support ListenBucketNotification: {exc}")
                return
            except Exception as exc:  # transport errors, 5xx, timeouts: retry with back-off
                error = _short(exc)
            if self._stop_event.is_set():
                break
            healthy = time.monotonic() - started >= 3 * self._ping
            if healthy:  # a stream that lived a while and then broke: start the back-off over
                failures, delay = 0, self._base_backoff
            else:
                failures += 1
            if not self.supported and failures >= self._max_failures:
                self._give_up(f"no listen stream after {failures} tries ({error})")
                return
            self.state = "backoff"
            log.info("listen.reconnect", bucket=self._bucket, retry_in=delay, error=error)
            self._stop_event.wait(delay)
            delay = min(self._max_backoff, delay * 2)
        self.state = "stopped"

    def _stream_once(self) -> None:
        """One listen request, read until it ends. Raises ListenUnsupported on a wrong answer."""
        response = self._open()
        self._response = response
        try:
            kind = (response.headers.get("Content-Type") or "").lower()
            if "xml" in kind or "html" in kind:
                raise ListenUnsupported(f"it answered {kind or 'no content type'} (a listing?)")
            while not self._stop_event.is_set():
                line = response.readline()
                if not line:
                    return  # the server closed the stream
                line = line.strip()
                if line:
                    self._on_line(line)
        finally:
            self._response = None
            response.close()
            response.release_conn()

    def _open(self) -> Any:
        """The raw listen request. ``_execute`` is minio's (private) signed-request helper; the
        public iterator around it is exactly what must be avoided (module docstring)."""
        try:
            return self._client._execute(
                "GET", self._bucket,
                query_params={"prefix": self._prefix, "suffix": "", "events": LISTEN_EVENTS,
                              "ping": str(self._ping)},
                preload_content=False,
            )
        except ValueError as exc:  # minio refuses locally, e.g. "not supported in Amazon S3"
            raise ListenUnsupported(str(exc)) from exc
        except S3Error as exc:
            status = exc.response.status if exc.response is not None else 0
            if 400 <= status < 500 or status == 501:
                raise ListenUnsupported(f"HTTP {status} {exc.code}") from exc
            raise

    def _on_line(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError as exc:
            raise ListenUnsupported(f"a non-JSON line: {line[:40]!r}") from exc
        if not isinstance(event, dict) or "Records" not in event:
            raise ListenUnsupported(f"a JSON line without Records: {line[:40]!r}")
        if not self.supported:
            self.supported = True
            log.info("listen.connected", bucket=self._bucket, prefix=self._prefix)
        self.state = "listening"
        records = event.get("Records") or []
        if records:  # keep-alives carry none
            self.events += len(records)
            try:
                if self._on_written is not None:
                    for key in self._created_keys(records):
                        self._on_written(key)
            finally:
                self._wake.set()

    def _created_keys(self, records: list[Any]) -> list[str]:
        """Keys relative to the prefix of the objects these records say were created. The listen
        stream sends keys unescaped; a key that names nothing costs one HEAD."""
        keys = []
        for record in records:
            try:
                created = str(record["eventName"]).startswith("s3:ObjectCreated:")
                name = record["s3"]["object"]["key"]
            except (KeyError, TypeError):
                continue  # not an event this watcher can use: the wake-up still stands
            if created and isinstance(name, str) and name.startswith(self._prefix) and name != self._prefix:
                keys.append(name[len(self._prefix):])
        return keys

    def _give_up(self, reason: str) -> None:
        self.supported = bool(self.supported)
        self.reason = reason
        self.state = "polling-only"
        log.warning("listen.unavailable", bucket=self._bucket, reason=reason,
                    fallback="polling the bucket listing every I2VFLOW_POLL_SECONDS")

    # -- control ---------------------------------------------------------------------------

    def stop(self, timeout: float = 5.0) -> None:
        """Stop reading; a blocked read is cut short by shutting the response down."""
        self._stop_event.set()
        response = self._response
        if response is not None:
            with contextlib.suppress(Exception):  # best effort; the thread is a daemon anyway
                response.shutdown()
        if self.is_alive():
            self.join(timeout)
        self.state = "stopped" if self.state != "polling-only" else self.state


def _short(exc: BaseException) -> str:
    """A one-line reason without URLs (a signed URL could carry credentials)."""
    text = str(exc).split("\n", 1)[0]
    if "?" in text:
        text = text.split("?", 1)[0] + "?..."
    return f"{type(exc).__name__}: {text[:200]}"
