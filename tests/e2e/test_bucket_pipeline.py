"""Put objects into a bucket, get videos back in a bucket: the whole path on the real stack.

A real S3 server over HTTP (moto's server on 127.0.0.1), the real Prefect server, a process
worker starting a process per flow run, the GPU task worker with the tiny model, MP4s decoded
after downloading them from the outbox bucket. moto has no ListenBucketNotification, so the
watcher here runs on polling (1 s) and, in one test, on the webhook.
"""

from __future__ import annotations

import io
import json
import re
import socket
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from minio import Minio

from infra.engine.video import probe_mp4
from infra.watch.bucket import ListenHints
from infra.watch.webhook import WebhookServer
from tests.helpers import FAST_SPEC, flow_runs_named, png_bytes, wait_for, wait_for_scans
from tests.s3server import S3Server, _remove_bucket

TOKEN = "e2e-webhook-token"


def put(client: Minio, bucket: str, key: str, data: bytes | dict) -> None:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    kind = "application/json" if key.endswith(".json") else "image/png"
    client.put_object(bucket, key, io.BytesIO(raw), len(raw), content_type=kind)


def get(client: Minio, bucket: str, key: str) -> bytes | None:
    try:
        response = client.get_object(bucket, key)
    except Exception:  # noqa: BLE001 - not there (yet)
        return None
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def sidecar(client: Minio, bucket: str, key: str, timeout: float = 150) -> dict[str, Any]:
    return json.loads(wait_for(lambda: get(client, bucket, key), timeout=timeout, what=f"s3://{bucket}/{key}"))


def video(client: Minio, bucket: str, key: str, tmp_path: Path) -> Any:
    path = tmp_path / f"{uuid.uuid4().hex}.mp4"
    path.write_bytes(get(client, bucket, key) or b"")
    return probe_mp4(path)


def etags(client: Minio, bucket: str, prefix: str) -> dict[str, str]:
    return {o.object_name: o.etag for o in client.list_objects(bucket, prefix=prefix, recursive=True)}


def runs_like(prefix: str) -> list[Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=prefix)))


@pytest.fixture
def out_bucket(s3_server: S3Server):
    client, name = s3_server.client(), f"out-{uuid.uuid4().hex[:12]}"
    client.make_bucket(name)
    yield name
    _remove_bucket(client, name)


@pytest.fixture
def watch_bucket(start_watcher, s3_server: S3Server, tmp_path: Path):
    """Start a watcher on s3:// locations, polling every second, pointed at the moto server."""
    def start(inbox: str, outbox: str, state: Path | None = None, **overrides: Any):
        settings = {**s3_server.settings_kwargs(), "poll_seconds": 1.0, **overrides}
        return start_watcher(inbox, outbox, state or tmp_path / "state", **settings)

    return start


def test_put_objects_get_video_sidecar_and_link_in_another_bucket(
        watch_bucket, s3_server: S3Server, s3_bucket, out_bucket: str, tmp_path: Path) -> None:
    client, bucket = s3_bucket
    put(client, bucket, "inbox/shoe.json", {"prompt": "product rotating slowly", **FAST_SPEC})
    put(client, bucket, "inbox/shoe.png", png_bytes())
    # Spaces, unicode and '+' in a subfolder; a defaults file covering an image alone.
    odd = "shoes/red shoe+1 ünï"
    put(client, bucket, f"inbox/{odd}.json", {"prompt": "camera zooming in", **FAST_SPEC, "fps": 12})
    put(client, bucket, f"inbox/{odd}.png", png_bytes(128, 96, (10, 200, 10)))
    put(client, bucket, "inbox/batch/_defaults.json", {"prompt": "clouds moving", **FAST_SPEC})
    put(client, bucket, "inbox/batch/a.png", png_bytes(color=(1, 2, 250)))
    # An image still uploading (multipart, not completed): not listed, so not a job yet.
    s3 = boto3.client("s3", endpoint_url=s3_server.url, region_name=s3_server.region,
                      aws_access_key_id=s3_server.access_key, aws_secret_access_key=s3_server.secret_key)
    put(client, bucket, "inbox/big.json", {"prompt": "slow pan", **FAST_SPEC})
    upload = s3.create_multipart_upload(Bucket=bucket, Key="inbox/big.png", ContentType="image/png")
    part = s3.upload_part(Bucket=bucket, Key="inbox/big.png", UploadId=upload["UploadId"], PartNumber=1,
                          Body=png_bytes(color=(250, 250, 0)))
    before = etags(client, bucket, "inbox/")
    handle = watch_bucket(f"s3://{bucket}/inbox", f"s3://{out_bucket}/outbox")
    assert [type(h) for h in handle.watcher.hint_sources] == [ListenHints]

    shoe = sidecar(client, out_bucket, "outbox/shoe.json")
    clip = video(client, out_bucket, "outbox/shoe.mp4", tmp_path)
    assert (clip.frames, clip.width, clip.height, round(clip.fps)) == (8, 64, 64, 8)
    assert shoe["video"]["url"] == f"s3://{out_bucket}/outbox/shoe.mp4"
    assert shoe["inputs"]["image"]["key"] == "shoe.png"
    runs = flow_runs_named([f"shoe-{shoe['job_id'][:6]}"])
    assert len(runs) == 1 and "source:bucket" in runs[0].tags
    link = _presigned_link(shoe["prefect"]["flow_run_id"])
    assert "X-Amz-Signature=" in link
    with urllib.request.urlopen(link, timeout=10) as response:  # noqa: S310 - loopback moto
        assert response.read() == get(client, out_bucket, "outbox/shoe.mp4")

    red = sidecar(client, out_bucket, f"outbox/{odd}.json")
    assert red["spec"]["fps"] == 12 and red["inputs"]["image"]["key"] == f"{odd}.png"
    assert video(client, out_bucket, f"outbox/{odd}.mp4", tmp_path).width == 88
    batch = sidecar(client, out_bucket, "outbox/batch/a.json")
    assert batch["inputs"]["defaults"] == ["batch/_defaults.json"] and batch["spec"]["prompt"] == "clouds moving"

    assert get(client, out_bucket, "outbox/big.json") is None and not runs_like("big-%")
    s3.complete_multipart_upload(Bucket=bucket, Key="inbox/big.png", UploadId=upload["UploadId"],
                                 MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
    assert etags(client, bucket, "inbox/")["inbox/big.png"].strip('"').endswith("-1"), "a multipart ETag"
    big = sidecar(client, out_bucket, "outbox/big.json")
    assert big["frames"] == 8
    after = etags(client, bucket, "inbox/")
    assert {k: v for k, v in after.items() if k != "inbox/big.png"} == before, "inputs untouched"


def _presigned_link(flow_run_id: str) -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    links = [a.data for a in artifacts if a.type == "markdown" and "X-Amz-Signature" in str(a.data)
             or a.type == "link"]
    match = re.search(r"\((https?://[^)]+)\)", str(links[0] if links else ""))
    assert match, [a.type for a in artifacts]
    return match.group(1)


BAD = {
    "not-an-image": ({"prompt": "p", **FAST_SPEC}, b"this is text, not a PNG", "invalid_image"),
    "empty": ({"prompt": "p", **FAST_SPEC}, b"", "invalid_image"),  # a 0-byte object
    "broken-json": (b'{"prompt": "p",, }', png_bytes(), "invalid_json"),
    "out-of-range": ({"prompt": "p", "fps": 100}, png_bytes(), "invalid_spec"),
}


def test_bad_objects_give_error_objects_and_deleted_inputs_give_no_output(
        watch_bucket, s3_bucket, tmp_path: Path) -> None:
    client, bucket = s3_bucket
    for stem, (spec, image, _) in BAD.items():
        put(client, bucket, f"inbox/{stem}.json", spec)
        put(client, bucket, f"inbox/{stem}.png", image)
    before = etags(client, bucket, "inbox/")
    handle = watch_bucket(f"s3://{bucket}/inbox", f"s3://{bucket}/outbox")

    # Put and deleted before it could settle: never a job.
    put(client, bucket, "inbox/flash.json", {"prompt": "p", **FAST_SPEC})
    put(client, bucket, "inbox/flash.png", png_bytes(color=(3, 3, 3)))
    client.remove_object(bucket, "inbox/flash.png")
    # Deleted after its run was created but before the flow fetched it: the run is cancelled.
    put(client, bucket, "inbox/gone.json", {"prompt": "p", **FAST_SPEC})
    put(client, bucket, "inbox/gone.png", png_bytes(color=(4, 4, 4)))
    gone_run = wait_for(lambda: runs_like("gone-%"), timeout=30, interval=0.05, what="run for gone")[0]
    client.remove_object(bucket, "inbox/gone.png")

    for stem, (_, _, error) in BAD.items():
        report = json.loads(wait_for(lambda s=stem: get(client, bucket, f"outbox/{s}.error.json"),
                                     what=f"error object for {stem}"))
        assert report["error"] == error, (stem, report)
        assert report["problems"] and report["problems"][0]["fix"]
        assert get(client, bucket, f"outbox/{stem}.mp4") is None

    def final_state() -> Any:
        from prefect import get_client

        with get_client(sync_client=True) as prefect:
            state = prefect.read_flow_run(gone_run.id).state
        return state if state and state.is_final() else None

    state = wait_for(final_state, timeout=90, what="the gone run to end")
    assert state.is_cancelled() and "deleted after detection" in (state.message or ""), state
    assert get(client, bucket, "outbox/gone.mp4") is None and get(client, bucket, "outbox/gone.error.json") is None
    assert not runs_like("flash-%"), "an object deleted before it settled never becomes a job"
    assert etags(client, bucket, "inbox/") == {**before, "inbox/flash.json": etags(
        client, bucket, "inbox/flash")["inbox/flash.json"], "inbox/gone.json": etags(
        client, bucket, "inbox/gone")["inbox/gone.json"]}, "bad inputs left untouched"
    assert handle.thread.is_alive(), "the watcher survived it all"


def test_restart_and_second_watcher_create_no_second_run(watch_bucket, s3_bucket, tmp_path: Path) -> None:
    client, bucket = s3_bucket
    put(client, bucket, "inbox/lamp.json", {"prompt": "light flickers", **FAST_SPEC})
    put(client, bucket, "inbox/lamp.png", png_bytes(color=(9, 9, 200)))
    inbox, outbox = f"s3://{bucket}/inbox", f"s3://{bucket}/outbox"
    first = watch_bucket(inbox, outbox, tmp_path / "state")
    lamp = sidecar(client, bucket, "outbox/lamp.json")
    first.stop()

    restarted = watch_bucket(inbox, outbox, tmp_path / "state")  # restart on the same ledger
    second = watch_bucket(inbox, outbox, tmp_path / "other-state")  # another host's watcher, own ledger
    put(client, bucket, "inbox/unrelated.txt", b"noise")
    wait_for_scans(restarted.watcher, second.watcher)  # each has seen the settled pair and acted on it
    runs = flow_runs_named([f"lamp-{lamp['job_id'][:6]}"])
    assert len(runs) == 1, [r.id for r in runs]
    assert lamp["prefect"]["flow_run_id"] == str(runs[0].id)


def test_webhook_event_starts_the_job_long_before_the_next_poll(watch_bucket, s3_bucket) -> None:
    client, bucket = s3_bucket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    handle = watch_bucket(f"s3://{bucket}/inbox", f"s3://{bucket}/outbox", poll_seconds=120,
                          webhook_port=port, webhook_token=TOKEN)
    hook = next(h for h in handle.watcher.hint_sources if isinstance(h, WebhookServer))
    time.sleep(1)  # the first listing (at start) is done; the next poll is 120 s away
    put(client, bucket, "inbox/vase ü+1.json", {"prompt": "flowers sway", **FAST_SPEC})
    put(client, bucket, "inbox/vase ü+1.png", png_bytes(color=(120, 0, 120)))
    event = {"EventName": "s3:ObjectCreated:Put", "Key": f"{bucket}/inbox%2Fvase+%C3%BC%2B1.png", "Records": [
        {"eventName": "s3:ObjectCreated:Put",
         "s3": {"bucket": {"name": bucket}, "object": {"key": "inbox%2Fvase+%C3%BC%2B1.png", "size": 1}}}]}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/minio", data=json.dumps(event).encode(),
                                     headers={"Authorization": f"Bearer {TOKEN}"}, method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
        assert json.loads(response.read())["woke"] is True
    # Well under the 120 s poll, with room for SQLite's lock retries (2-30 s) on the run's creation.
    wait_for(lambda: runs_like("vase ü+1-%"), timeout=60, interval=0.05, what="run created after the event")
    assert hook.stats.wakes == 1
    vase = sidecar(client, bucket, "outbox/vase ü+1.json")
    assert vase["frames"] == 8
    handle.stop_event.set()
    handle.watcher.wake.set()  # it sleeps on wake; let it see the stop at once
