"""The MinIO listen fast path: support detection, bounded reconnects, events that wake.

Real servers only: moto's S3 server (which lacks ListenBucketNotification and answers the
request with a bucket listing, the case that makes minio's own iterator spin forever), a port
where nothing listens, and a small stdlib HTTP server that streams MinIO-style event lines
(MinIO's server does not install here; the lines follow MinIO's documented event format).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from structlog.testing import capture_logs

from infra.ledger import Ledger
from infra.settings import Settings
from infra.store.bucket import BucketStore, make_client
from infra.watch.bucket import ListenHints
from infra.watch.service import Watcher
from tests.helpers import png_bytes, wait_for
from tests.infra.watch.test_service import Recorder
from tests.s3server import S3Server


class _CountListen(logging.Handler):
    """Counts the listen requests moto's HTTP server logs (werkzeug access log lines)."""

    def __init__(self, bucket: str) -> None:
        super().__init__(logging.INFO)
        self.marker = f"/{bucket}?"
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.marker in message and "events=" in message:
            self.count += 1


@pytest.fixture
def listen_requests(s3_bucket) -> Iterator[_CountListen]:
    logger = logging.getLogger("werkzeug")
    handler, level = _CountListen(s3_bucket[1]), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_moto_lacks_listen_so_one_request_one_warning_then_polling_only(
        s3_server: S3Server, s3_bucket, listen_requests: _CountListen) -> None:
    _, bucket = s3_bucket
    wake = threading.Event()
    hints = ListenHints(s3_server.client(), bucket, "inbox/", wake)
    with capture_logs() as logs:
        hints.start()
        hints.join(10)
        time.sleep(2)  # long enough for a tight loop to send hundreds of requests
    assert not hints.is_alive() and hints.state == "polling-only", hints.reason
    assert hints.supported is False and "xml" in hints.reason
    assert hints.requests == 1 and listen_requests.count == 1, "the server saw exactly one listen request"
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [w["event"] for w in warnings] == ["listen.unavailable"]
    assert not wake.is_set()


def test_unreachable_server_backs_off_a_bounded_number_of_times() -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = make_client(f"127.0.0.1:{port}", "k", "s", region="us-east-1", connect_timeout=1, retries=0)
    hints = ListenHints(client, "inbox-bucket", "", threading.Event(), max_failures=4, base_backoff=0.05)
    started = time.monotonic()
    with capture_logs() as logs:
        hints.start()
        hints.join(10)
    assert hints.state == "polling-only" and hints.requests == 4
    assert "after 4 tries" in hints.reason and "MaxRetryError" in hints.reason
    assert time.monotonic() - started >= 0.05 + 0.1 + 0.2, "back-off between tries"
    assert sum(entry["log_level"] == "warning" for entry in logs) == 1


class _FakeMinioListen(BaseHTTPRequestHandler):
    """Streams what MinIO's listen API streams: a keep-alive, one event, then ends the stream."""

    requests: list[dict[str, list[str]]] = []

    def do_GET(self) -> None:  # noqa: N802
        type(self).requests.append(parse_qs(urlsplit(self.path).query))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write(b'{"Records":null}\n')
        self.wfile.flush()
        time.sleep(0.3)
        record = {"eventName": "s3:ObjectCreated:Put",
                  "s3": {"bucket": {"name": "assets"}, "object": {"key": "inbox/red shoe.png", "size": 9}}}
        self.wfile.write(json.dumps({"Records": [record]}).encode() + b"\n")
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


def test_a_listen_stream_wakes_the_scan_and_reconnects_after_it_ends() -> None:
    _FakeMinioListen.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeMinioListen)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = make_client(f"127.0.0.1:{server.server_address[1]}", "k", "s", region="us-east-1", retries=0)
        wake = threading.Event()
        hints = ListenHints(client, "assets", "inbox/", wake, base_backoff=0.2)
        hints.start()
        assert wake.wait(5), "an event line sets wake"
        assert hints.supported is True and hints.events == 1
        wait_for(lambda: hints.requests >= 2, timeout=5, interval=0.05, what="reconnect after the stream ended")
        query = _FakeMinioListen.requests[0]
        assert query["prefix"] == ["inbox/"] and query["ping"] == ["10"]
        assert set(query["events"]) == {"s3:ObjectCreated:*", "s3:ObjectRemoved:*"}
        time.sleep(1.0)
        # Streams that end at once count as failures: 0.2, 0.4, 0.8 s apart, not a tight loop.
        assert hints.requests <= 4, hints.requests
        hints.stop()
        assert not hints.is_alive() and hints.state == "stopped"
    finally:
        server.shutdown()
        server.server_close()


class _QueuedMinioListen(BaseHTTPRequestHandler):
    """A listen stream that sends the event lines a test puts in ``lines``, as they come."""

    lines: queue.Queue[bytes] = queue.Queue()

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        while True:
            try:
                line = type(self).lines.get(timeout=0.5)
            except queue.Empty:
                line = b'{"Records":null}'  # MinIO's keep-alive
            try:
                self.wfile.write(line + b"\n")
                self.wfile.flush()
            except OSError:
                return

    def log_message(self, *args: object) -> None:
        pass


def _created(bucket: str, name: str, size: int) -> bytes:
    record = {"eventName": "s3:ObjectCreated:Put",
              "s3": {"bucket": {"name": bucket}, "object": {"key": name, "size": size}}}
    return json.dumps({"Records": [record]}).encode()


def test_created_events_let_a_pair_go_out_at_its_first_look(s3_server: S3Server, s3_bucket, tmp_path: Path) -> None:
    """A listen event says the object exists, and an S3 object exists only whole: the watcher
    takes the version it finds as settled, instead of waiting a settle period for a second look.
    A removal event and an object outside the prefix vouch for nothing."""
    client, bucket = s3_bucket
    _QueuedMinioListen.lines = queue.Queue()
    stream = ThreadingHTTPServer(("127.0.0.1", 0), _QueuedMinioListen)
    threading.Thread(target=stream.serve_forever, daemon=True).start()
    location, recorder = f"s3://{bucket}/inbox", Recorder()
    settings = Settings(inbox=location, outbox=f"s3://{bucket}/outbox", state_dir=tmp_path / "st",
                        rescan_seconds=120, settle_seconds=600.0, **s3_server.settings_kwargs())
    watcher = Watcher(settings, BucketStore(client, bucket, "inbox"), location, settings.outbox,
                      Ledger(settings.ledger_path), recorder.submit, lambda *_: None, "bucket")
    vouched: list[str] = []

    def vouch(key: str) -> None:
        vouched.append(key)
        watcher.vouch(key)

    listen_client = make_client(f"127.0.0.1:{stream.server_address[1]}", "k", "s", region="us-east-1", retries=0)
    hints = ListenHints(listen_client, bucket, "inbox/", watcher.wake, on_written=vouch)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    try:
        hints.start()
        thread.start()
        wait_for(lambda: hints.supported, timeout=10, what="the listen stream")
        time.sleep(3.5)  # a quiet spell after the start-up listing
        spec, image = json.dumps({"prompt": "p"}).encode(), png_bytes(color=(7, 7, 7))
        for name, data in (("inbox/quick.json", spec), ("inbox/quick.png", image)):
            client.put_object(bucket, name, io.BytesIO(data), len(data))
        removed = {"eventName": "s3:ObjectRemoved:Delete", "s3": {"object": {"key": "inbox/gone.png"}}}
        _QueuedMinioListen.lines.put(json.dumps({"Records": [removed]}).encode())
        _QueuedMinioListen.lines.put(_created(bucket, "elsewhere/quick.png", len(image)))
        _QueuedMinioListen.lines.put(_created(bucket, "inbox/quick.json", len(spec)))
        _QueuedMinioListen.lines.put(_created(bucket, "inbox/quick.png", len(image)))
        # Settling by two looks would take 10 minutes: a submission within a minute is the events' doing.
        wait_for(lambda: recorder.calls, timeout=60, interval=0.02, what="submission without a settle period")
        assert vouched == ["quick.json", "quick.png"]
        assert recorder.calls[0].image_sha256 == hashlib.sha256(image).hexdigest()
    finally:
        stop.set()
        watcher.wake.set()
        thread.join(10)
        hints.stop()
        stream.shutdown()
        stream.server_close()
