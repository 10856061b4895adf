"""The watcher's webhook: S3 servers push "an object changed" and the next listing comes at once.

Why an event only sets ``wake``: a push can be forged, doubled, late or about an object that is
already gone. The scanner lists the bucket, waits for two equal looks (size and ETag) and pairs
files before any job exists, so the worst a bad event can do is cause one extra listing.

Formats understood (one endpoint, any path):
- MinIO's webhook target: the AWS S3 event structure (``Records[].s3.object.key``) plus top-level
  ``EventName`` and ``Key``. Keys are URL-escaped (Go QueryEscape: ``/`` -> ``%2F``, space ->
  ``+``), so they are decoded with ``unquote_plus``. MinIO probes the endpoint with HEAD.
- AWS SNS HTTP(S) subscriptions: ``SubscriptionConfirmation`` (the ``SubscribeURL`` is fetched,
  only when its host is allowed), ``Notification`` (``Message`` holds the S3 event JSON; moto's
  ``eventName`` has no ``s3:`` prefix) and ``UnsubscribeConfirmation``.

Authentication: ``Authorization: Bearer <token>`` (MinIO's ``auth_token``; a bare token is also
taken) or HTTP Basic with the token as password (SNS sends the user info of an endpoint URL such
as ``https://i2vflow:TOKEN@watcher:8088/sns``). A request without it gets 401 and is logged
without its body. Bodies over ``max_body`` get 413 unread.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote_plus, urlsplit

import structlog

from infra.jobs import is_ignored

log = structlog.get_logger("i2vflow.watch.webhook")

# Where a real SNS SubscribeURL points: https://sns.<region>.amazonaws.com[.cn]/?Action=...
AWS_SNS_HOST = re.compile(r"sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?")
MAX_BODY = 1024 * 1024


@dataclass
class WebhookStats:
    """Counters a test or an operator can read (also logged per request)."""

    requests: int = 0
    unauthorized: int = 0
    records: int = 0
    wakes: int = 0
    confirmations: int = 0
    rejected: dict[int, int] = field(default_factory=dict)


def _fetch(url: str) -> int:
    """GET a URL (an SNS SubscribeURL) and return the HTTP status."""
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - host checked by caller
        response.read(64 * 1024)
        return response.status


class WebhookServer:
    """A small threaded HTTP server that sets ``wake`` for S3 events under ``bucket/prefix``.

    ``bucket``/``prefix`` filter events: a record for another bucket, or for a key outside the
    inbox prefix (the outbox in the same bucket, say), is counted but wakes nothing. Before it
    wakes, ``on_written`` is told the key (relative to the prefix) of each object created: an S3
    object exists only whole, so the watcher may settle that version at its first look.
    ``confirm_host`` decides which SubscribeURL hosts may be fetched (AWS SNS by default: a
    confirmation is an outgoing request chosen by whoever can post here).
    """

    def __init__(self, wake: threading.Event, token: str, *, host: str = "127.0.0.1", port: int = 0,
                 bucket: str | None = None, prefix: str = "", max_body: int = MAX_BODY,
                 confirm_host: Callable[[str], bool] | None = None,
                 fetch: Callable[[str], int] = _fetch,
                 on_written: Callable[[str], None] | None = None) -> None:
        if not token:
            raise ValueError("the webhook needs a token: set I2VFLOW_WEBHOOK_TOKEN")
        self.wake = wake
        self.on_written = on_written
        self.bucket = bucket
        self.prefix = prefix
        self.max_body = max_body
        self.stats = WebhookStats()
        self._token = token.encode()
        self._confirm_host = confirm_host or (lambda host: bool(AWS_SNS_HOST.fullmatch(host)))
        self._fetch = fetch
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.webhook = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="webhook", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}/"

    def start(self) -> WebhookServer:
        self._thread.start()
        log.info("webhook.listening", url=self.url, bucket=self.bucket, prefix=self.prefix)
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    # -- what a request means --------------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.strip().partition(" ")
        if not value:  # a bare token
            candidate = scheme
        elif scheme.lower() == "bearer":
            candidate = value.strip()
        elif scheme.lower() == "basic":
            try:
                candidate = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
            except ValueError:
                return False
        else:
            return False
        return hmac.compare_digest(candidate.encode(), self._token)

    def handle_document(self, doc: Any) -> tuple[int, dict[str, Any]]:
        """Act on one parsed body; return (HTTP status, small JSON answer)."""
        if not isinstance(doc, dict):
            return 400, {"error": "expected a JSON object"}
        kind = doc.get("Type")
        if kind == "SubscriptionConfirmation":
            return self._confirm(doc)
        if kind == "UnsubscribeConfirmation":
            log.info("webhook.sns_unsubscribed", topic=doc.get("TopicArn"))
            return 200, {"ok": True}
        if kind == "Notification":
            try:
                doc = json.loads(doc.get("Message") or "")
            except (TypeError, ValueError):
                return 400, {"error": "SNS Message is not JSON"}
            if not isinstance(doc, dict):
                return 400, {"error": "SNS Message is not a JSON object"}
        records = doc.get("Records")
        if records is None:  # s3:TestEvent and similar
            log.info("webhook.ignored", s3_event=str(doc.get("Event") or doc.get("EventName") or "")[:100])
            return 200, {"records": 0, "woke": False}
        if not isinstance(records, list):
            return 400, {"error": "Records must be a list"}
        relevant = [record for record in records if self._relevant(record)]
        with self._lock:
            self.stats.records += len(records)
            if relevant:
                self.stats.wakes += 1
        if relevant:
            try:
                for record in relevant:
                    if self.on_written is not None and _created(record):
                        self.on_written((object_key(record) or "")[len(self.prefix):])
            finally:
                self.wake.set()
        log.info("webhook.event", records=len(records), relevant=len(relevant),
                 first=_describe(relevant[0]) if relevant else None)
        return 200, {"records": len(records), "woke": bool(relevant)}

    def _relevant(self, record: Any) -> bool:
        """A create/remove event for a key under the inbox prefix of the inbox bucket."""
        if not isinstance(record, dict):
            return False
        name = str(record.get("eventName") or "").removeprefix("s3:")
        if not name.startswith(("ObjectCreated", "ObjectRemoved")):
            return False
        s3 = record.get("s3") if isinstance(record.get("s3"), dict) else {}
        bucket = (s3.get("bucket") or {}).get("name") if isinstance(s3.get("bucket"), dict) else None
        key = object_key(record)
        if key is None or (self.bucket and bucket != self.bucket):
            return False
        return key.startswith(self.prefix) and not is_ignored(key[len(self.prefix):] or ".")

    def _confirm(self, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        url = str(doc.get("SubscribeURL") or "")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not self._confirm_host(parts.hostname or ""):
            log.warning("webhook.sns_confirm_refused", topic=doc.get("TopicArn"), host=parts.hostname)
            return 403, {"error": "SubscribeURL host not allowed"}
        try:
            status = self._fetch(url)
        except Exception as exc:  # noqa: BLE001 - report, and let SNS resend the confirmation
            log.warning("webhook.sns_confirm_failed", topic=doc.get("TopicArn"), error=type(exc).__name__)
            return 502, {"error": "could not fetch SubscribeURL"}
        with self._lock:
            self.stats.confirmations += 1
        log.info("webhook.sns_confirmed", topic=doc.get("TopicArn"), status=status)
        return 200, {"confirmed": True}


def object_key(record: dict[str, Any]) -> str | None:
    """The decoded object key of one S3 event record (URL-escaped on the wire, ``+`` = space)."""
    s3 = record.get("s3")
    obj = s3.get("object") if isinstance(s3, dict) else None
    key = obj.get("key") if isinstance(obj, dict) else None
    return unquote_plus(key) if isinstance(key, str) else None


def _created(record: dict[str, Any]) -> bool:
    return str(record.get("eventName") or "").removeprefix("s3:").startswith("ObjectCreated")


def _describe(record: dict[str, Any]) -> dict[str, Any]:
    return {"event": str(record.get("eventName"))[:60], "key": (object_key(record) or "")[:300]}


class _Handler(BaseHTTPRequestHandler):
    server_version = "i2vflow-webhook"
    timeout = 10  # a client that stops sending mid-request is dropped

    @property
    def hook(self) -> WebhookServer:
        return self.server.webhook  # type: ignore[attr-defined]

    def do_HEAD(self) -> None:  # noqa: N802 - MinIO probes the endpoint with HEAD at start-up
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        self._answer(405, {"error": "POST events here"}, allow="HEAD, POST")

    def do_POST(self) -> None:  # noqa: N802
        hook = self.hook
        with hook._lock:
            hook.stats.requests += 1
        if not hook.authorized(self.headers.get("Authorization")):
            with hook._lock:
                hook.stats.unauthorized += 1
            log.warning("webhook.unauthorized", client=self.client_address[0], path=self.path[:200],
                        length=self.headers.get("Content-Length"))
            self.close_connection = True
            self._answer(401, {"error": "missing or wrong token"}, authenticate='Bearer realm="i2vflow"')
            return
        try:
            length = int(self.headers.get("Content-Length") or "-1")
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._answer(411, {"error": "Content-Length required"})
            return
        if length > hook.max_body:
            self.close_connection = True
            self._answer(413, {"error": f"body over {hook.max_body} bytes"})
            return
        body = self.rfile.read(length)
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            self._answer(400, {"error": "body is not JSON"})
            return
        try:
            status, answer = hook.handle_document(doc)
        except Exception as exc:  # noqa: BLE001 - a malformed event must not kill the thread
            log.warning("webhook.failed", error=type(exc).__name__)
            status, answer = 500, {"error": "could not handle the event"}
        self._answer(status, answer)

    def _answer(self, status: int, payload: dict[str, Any], **headers: str) -> None:
        if status >= 400:
            with self.hook._lock:
                self.hook.stats.rejected[status] = self.hook.stats.rejected.get(status, 0) + 1
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if "allow" in headers:
            self.send_header("Allow", headers["allow"])
        if "authenticate" in headers:
            self.send_header("WWW-Authenticate", headers["authenticate"])
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet stderr; structlog logs
        pass
