"""The webhook receiver over real HTTP on 127.0.0.1: auth, limits, MinIO and SNS formats, and
events that make a real watcher list a real (moto) bucket sooner than its polling would.

The Prefect submission is the seam here (a recorder); tests/e2e covers the real server.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from minio.notificationconfig import NotificationConfig, PrefixFilterRule, TopicConfig
from structlog.testing import capture_logs

from infra.ledger import Ledger
from infra.settings import Settings
from infra.store.bucket import BucketStore
from infra.watch.service import Watcher
from infra.watch.webhook import WebhookServer, object_key
from tests.helpers import FAST_SPEC, png_bytes, wait_for
from tests.infra.watch.test_service import Recorder
from tests.s3server import S3Server

TOKEN = "s3cret-token-for-tests"
SECRET_MARKER = "BODY-MUST-NOT-BE-LOGGED"


def minio_event(bucket: str, escaped_key: str, name: str = "s3:ObjectCreated:Put") -> dict[str, Any]:
    """What MinIO's webhook target posts (keys URL-escaped, as Go's QueryEscape does)."""
    return {
        "EventName": name,
        "Key": f"{bucket}/{escaped_key}",
        "Records": [{
            "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "",
            "eventTime": "2026-11-26T06:00:00.000Z", "eventName": name,
            "userIdentity": {"principalId": "minioadmin"},
            "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
                   "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                   "object": {"key": escaped_key, "size": 1234, "eTag": "0123abcd",
                              "contentType": "image/png", "sequencer": "17F1C2D3E4"}},
        }],
    }


def post(hook: WebhookServer, body: bytes | dict, headers: dict[str, str] | None = None,
         method: str = "POST", path: str = "/minio") -> tuple[int, dict[str, Any]]:
    host, port = hook.address
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=raw if method == "POST" else None, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, (json.loads(data) if data else {})
    finally:
        conn.close()


BEARER = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


@pytest.fixture
def hook() -> Iterator[WebhookServer]:
    server = WebhookServer(threading.Event(), TOKEN, bucket="assets", prefix="inbox/").start()
    yield server
    server.stop()


def test_head_is_answered_without_a_token(hook: WebhookServer) -> None:
    assert post(hook, b"", method="HEAD")[0] == 200
    assert post(hook, b"", method="GET")[0] == 405


def test_without_the_token_401_and_the_body_is_not_logged(hook: WebhookServer) -> None:
    event = minio_event("assets", "inbox%2Fshoe.png")
    event["Secret"] = SECRET_MARKER
    with capture_logs() as logs:
        assert post(hook, event, {})[0] == 401
        assert post(hook, event, {"Authorization": "Bearer wrong"})[0] == 401
        assert post(hook, event, {"Authorization": f"Token {TOKEN}"})[0] == 401
    assert not hook.wake.is_set() and hook.stats.unauthorized == 3
    assert [entry["event"] for entry in logs] == ["webhook.unauthorized"] * 3
    assert SECRET_MARKER not in repr(logs) and TOKEN not in repr(logs)


def test_bearer_bare_and_basic_tokens_are_accepted(hook: WebhookServer) -> None:
    event = minio_event("assets", "inbox%2Fshoe.png")
    basic = base64.b64encode(f"sns:{TOKEN}".encode()).decode()
    for header in (f"Bearer {TOKEN}", TOKEN, f"Basic {basic}"):
        hook.wake.clear()
        assert post(hook, event, {"Authorization": header}) == (200, {"records": 1, "woke": True})
        assert hook.wake.is_set()


def test_bodies_over_the_cap_get_413_and_junk_gets_400() -> None:
    hook = WebhookServer(threading.Event(), TOKEN, max_body=1000).start()
    try:
        assert post(hook, b"x" * 5000, BEARER)[0] == 413
        assert post(hook, b"{not json", BEARER)[0] == 400
        assert post(hook, {"Records": "nope"}, BEARER)[0] == 400
        assert not hook.wake.is_set()
    finally:
        hook.stop()


def test_minio_keys_are_unescaped_and_only_inbox_events_wake(hook: WebhookServer) -> None:
    escaped = "inbox%2Fshoes%2Fred+shoe+%C3%BCn%C3%AF%2B1.png"  # "inbox/shoes/red shoe ünï+1.png"
    event = minio_event("assets", escaped)
    assert object_key(event["Records"][0]) == "inbox/shoes/red shoe ünï+1.png"
    assert post(hook, event, BEARER) == (200, {"records": 1, "woke": True})
    for other in (minio_event("other-bucket", "inbox%2Fa.png"),  # another bucket
                  minio_event("assets", "outbox%2Fa.mp4"),  # our own output in the same bucket
                  minio_event("assets", "inbox%2F.hidden.png"),  # ignored names
                  minio_event("assets", "inbox%2Fa.png", "s3:ObjectAccessed:Get"),
                  {"Event": "s3:TestEvent", "Bucket": "assets"}):  # AWS's test event
        hook.wake.clear()
        status, answer = post(hook, other, BEARER)
        assert status == 200 and answer.get("woke") is False, other
        assert not hook.wake.is_set()


class _Stub(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        type(self).hits.append(self.path)
        body = b"<ConfirmSubscriptionResponse/>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_sns_subscription_confirmation_fetches_only_allowed_hosts() -> None:
    _Stub.hits = []
    stub = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    confirm = {"Type": "SubscriptionConfirmation", "TopicArn": "arn:aws:sns:us-east-1:123:assets",
               "Token": "tok", "Message": "You have chosen to subscribe...",
               "SubscribeURL": f"http://127.0.0.1:{stub.server_address[1]}/?Action=ConfirmSubscription&Token=tok"}
    default = WebhookServer(threading.Event(), TOKEN).start()  # allows AWS SNS hosts only
    loopback = WebhookServer(threading.Event(), TOKEN, confirm_host=lambda host: host == "127.0.0.1").start()
    try:
        assert post(default, confirm, BEARER)[0] == 403 and _Stub.hits == []
        assert post(loopback, confirm, BEARER) == (200, {"confirmed": True})
        assert _Stub.hits == ["/?Action=ConfirmSubscription&Token=tok"]
        assert loopback.stats.confirmations == 1 and not loopback.wake.is_set()
    finally:
        default.stop()
        loopback.stop()
        stub.shutdown()
        stub.server_close()


# -- events wake a real watcher over a real bucket ----------------------------------------------

@pytest.fixture
def slow_polling_watcher(s3_server: S3Server, s3_bucket, tmp_path: Path):
    """A watcher over s3://bucket/inbox that lists only every 120 s unless woken."""
    client, bucket = s3_bucket
    stops: list[tuple[threading.Event, threading.Thread, Watcher]] = []

    def make(recorder: Recorder, settle_seconds: float = 0.2) -> Watcher:
        location = f"s3://{bucket}/inbox"
        settings = Settings(inbox=location, outbox=f"s3://{bucket}/outbox", state_dir=tmp_path / "st",
                            rescan_seconds=120, settle_seconds=settle_seconds, **s3_server.settings_kwargs())
        watcher = Watcher(settings, BucketStore(client, bucket, "inbox"), location, settings.outbox,
                          Ledger(settings.ledger_path), recorder.submit, lambda *_: None, "bucket")
        stop = threading.Event()
        thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
        thread.start()
        stops.append((stop, thread, watcher))
        time.sleep(0.5)  # its first listing is done; the next is 120 s away
        return watcher

    yield make
    for stop, thread, watcher in stops:
        stop.set()
        watcher.wake.set()  # it sleeps on wake, not on stop
        thread.join(10)


def _put_job(client, bucket: str, stem: str) -> None:
    import io

    spec = json.dumps({"prompt": "turning", **FAST_SPEC}).encode()
    image = png_bytes()
    client.put_object(bucket, f"inbox/{stem}.json", io.BytesIO(spec), len(spec), content_type="application/json")
    client.put_object(bucket, f"inbox/{stem}.png", io.BytesIO(image), len(image), content_type="image/png")


def test_a_minio_event_makes_the_watcher_list_at_once(slow_polling_watcher, s3_bucket) -> None:
    client, bucket = s3_bucket
    recorder = Recorder()
    watcher = slow_polling_watcher(recorder)
    hook = WebhookServer(watcher.wake, TOKEN, bucket=bucket, prefix="inbox/").start()
    try:
        _put_job(client, bucket, "red shoe+1")
        time.sleep(1.0)
        assert recorder.calls == [], "no event, no listing before the poll interval"
        assert post(hook, minio_event(bucket, "inbox%2Fred+shoe%2B1.png"), BEARER)[1]["woke"] is True
        # Well inside the 120 s listing interval: the event woke the watcher.
        wait_for(lambda: recorder.calls, timeout=60, interval=0.05, what="submission after the event")
        assert [t.image_key for t in recorder.calls] == ["red shoe+1.png"]
    finally:
        hook.stop()


def test_moto_s3_events_through_sns_reach_the_webhook_end_to_end(
        slow_polling_watcher, s3_server: S3Server, s3_bucket) -> None:
    """put_object -> moto S3 notification -> SNS topic -> HTTP subscription -> webhook -> scan.
    The created events vouch for the objects: the pair goes out at the first look, not after the
    10-minute settle period that two looks would take here."""
    client, bucket = s3_bucket
    recorder = Recorder()
    watcher = slow_polling_watcher(recorder, settle_seconds=600.0)
    vouched: list[str] = []
    hook = WebhookServer(watcher.wake, TOKEN, bucket=bucket, prefix="inbox/",
                         on_written=lambda key: (vouched.append(key), watcher.vouch(key))).start()
    sns = boto3.client("sns", endpoint_url=s3_server.url, region_name=s3_server.region,
                       aws_access_key_id=s3_server.access_key, aws_secret_access_key=s3_server.secret_key)
    topic = sns.create_topic(Name=f"{bucket}-events")["TopicArn"]
    host, port = hook.address
    # SNS sends the user info of the endpoint URL as HTTP Basic auth: the token is the password.
    sns.subscribe(TopicArn=topic, Protocol="http", Endpoint=f"http://sns:{TOKEN}@{host}:{port}/sns")
    rule = TopicConfig(["s3:ObjectCreated:*"], config_id="i2vflow", topic=topic,
                       prefix_filter_rule=PrefixFilterRule("inbox/"))
    client.set_bucket_notification(bucket, NotificationConfig(topic_config_list=[rule]))
    try:
        _put_job(client, bucket, "lamp ünï")
        wait_for(lambda: recorder.calls, timeout=60, interval=0.05, what="submission after the SNS event")
        assert hook.stats.wakes >= 1 and hook.stats.unauthorized == 0
        assert [t.image_key for t in recorder.calls] == ["lamp ünï.png"]
        assert sorted(vouched) == ["lamp ünï.json", "lamp ünï.png"], "decoded keys, relative to the prefix"
    finally:
        hook.stop()
        sns.delete_topic(TopicArn=topic)
