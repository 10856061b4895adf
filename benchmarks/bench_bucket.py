"""Bucket watching on this machine: put -> flow run created, listing cost, an S3 restart mid-run.

Why: the bucket promise is the folder's ("a few seconds later, a run") without inotify. This
starts a moto S3 server in this process (on a fixed loopback port, so it can be stopped and
started again with its data kept, like a MinIO restart with its disks), a fresh Prefect server,
the deployment, the flow and GPU workers, and a watcher built by ``build_watcher``. It reports:

1. listing cost: ``BucketStore.list`` and a full ``Watcher.scan_once`` over N objects (10,000);
2. put -> flow run created, polling at the default ``I2VFLOW_POLL_SECONDS``, per job;
3. the same with push: moto's S3 -> SNS -> HTTP subscription -> the watcher's webhook;
4. the S3 server stopped while a run is running, for ``--down`` seconds, then started again on
   the same port: what the run did, and how long until the watcher listed again and a job put
   after the restart had its run.

    python -m benchmarks.bench_bucket --objects 10000 --jobs 5 --down 60
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
from minio.notificationconfig import NotificationConfig, PrefixFilterRule, TopicConfig
from moto.server import ThreadedMotoServer

from infra.service import Supervisor, apply_deployments, prefect_env, start_prefect_server, start_workers
from infra.settings import Settings
from infra.store.bucket import make_client
from tests.helpers import png_bytes
from tests.ports import free_port
from tests.s3server import S3Server

TOKEN = "bench-token"


class Moto:
    """moto's server on a fixed port; its data lives in this process and survives a restart."""

    def __init__(self, port: int) -> None:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.port = port
        self.info = S3Server(endpoint=f"127.0.0.1:{port}")
        self.server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        assert self.server is not None
        self.server.stop()
        self.server._server.server_close()  # type: ignore[union-attr]  # free the port: refuse, not hang
        self.server = None


def put(client: Any, bucket: str, key: str, data: bytes) -> None:
    client.put_object(bucket, key, io.BytesIO(data), len(data))


def put_job(client: Any, bucket: str, stem: str, index: int) -> float:
    put(client, bucket, f"inbox/{stem}.json", json.dumps({"prompt": "product turning", "num_frames": 8,
                                                          "steps": 10}).encode())
    put(client, bucket, f"inbox/{stem}.png", png_bytes(color=(index * 37 % 255, 90, 140)))
    return time.time()


def run_created(stem: str, timeout: float = 120) -> Any:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=f"{stem}-%")))
        if runs:
            return runs[0]
        time.sleep(0.05)
    raise TimeoutError(f"no run for {stem}")


def wait_state(run_id: Any, want: Any, timeout: float = 300) -> Any:
    from prefect import get_client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
        if state is not None and want(state):
            return state
        time.sleep(0.1)
    raise TimeoutError(f"run {run_id}: state never matched")


def start_watcher(settings: Settings) -> tuple[Any, threading.Event, Any]:
    from flows.generate import hand_over_render
    from infra.watch.run import build_watcher

    watcher, close = build_watcher(settings, hand_over=hand_over_render)
    stop = threading.Event()
    threading.Thread(target=watcher.run, args=(stop,), daemon=True).start()
    return watcher, stop, close


def stop_watcher(watcher: Any, stop: threading.Event, close: Any) -> None:
    stop.set()
    watcher.wake.set()
    close()


def listing_cost(moto: Moto, objects: int, base: dict[str, Any], state: Path) -> dict[str, Any]:
    """Put ``objects`` small images (no JSON: nothing pairs, so a scan only lists and settles)."""
    from infra.ledger import Ledger
    from infra.store import open_store
    from infra.watch.service import Watcher

    client = moto.info.client()
    client.make_bucket("listing")
    body = b"x" * 64
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: put(client, "listing", f"inbox/d{i % 100:02d}/img-{i:06d}.png", body),
                      range(objects)))
    put_s = time.perf_counter() - started
    settings = Settings(inbox="s3://listing/inbox", outbox="s3://listing/outbox", state_dir=state / "listing",
                        **base)
    store = open_store(settings.inbox, settings)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        count = sum(1 for _ in store.list())
        times.append(time.perf_counter() - started)
    watcher = Watcher(settings, store, settings.inbox, settings.outbox, Ledger(settings.ledger_path),
                      lambda *_: "", lambda *_: None, "bucket")
    scans = []
    for _ in range(3):
        started = time.perf_counter()
        report = watcher.scan_once()
        scans.append(time.perf_counter() - started)
        time.sleep(settings.settle_seconds)
    return {"objects": count, "put_all_s": round(put_s, 1), "list_s": [round(t, 3) for t in times],
            "scan_once_s": [round(t, 3) for t in scans], "listed_by_scan": report.listed,
            "list_requests": -(-count // 1000)}


def latency(client: Any, bucket: str, prefix: str, jobs: int, mode: str) -> list[dict[str, float]]:
    rows = []
    for index in range(jobs):
        stem = f"{prefix}-{index}"
        time.sleep(0.7 + (index * 1.3) % 4)  # put at different phases of the poll interval
        put_at = put_job(client, bucket, stem, index)
        run = run_created(stem)
        rows.append({"mode": mode, "put_to_run_created_s": round(run.created.timestamp() - put_at, 3)})
        print(json.dumps({"job": stem, **rows[-1]}), flush=True)
    return rows


def start_stack(sup: Supervisor, s3: S3Server, work: Path, state: Path) -> None:
    """A fresh Prefect server, the deployment, the flow and GPU workers, all pointed at ``s3``."""
    sup.env.pop("PREFECT_API_URL")
    sup.env["PREFECT_HOME"] = str(state / "prefect")
    api = start_prefect_server(sup, free_port(), lambda m: None)
    sup.env = prefect_env(api, state, {
        "I2VFLOW_MODEL_CACHE": str(work / "models"), "I2VFLOW_STATE_DIR": str(state),
        "PREFECT_HOME": str(state / "prefect"), "PREFECT_WORKER_QUERY_SECONDS": "1",
        "I2VFLOW_S3_ENDPOINT": s3.endpoint, "I2VFLOW_S3_REGION": s3.region,
        "I2VFLOW_S3_ACCESS_KEY": s3.access_key, "I2VFLOW_S3_SECRET_KEY": s3.secret_key})
    os.environ.update({k: sup.env[k] for k in ("PREFECT_API_URL", "PREFECT_LOCAL_STORAGE_PATH")})
    apply_deployments(sup.env, "i2vflow", 1)
    start_workers(sup, "i2vflow")


def polling_and_push_latency(s3: S3Server, base: dict[str, Any], state: Path, jobs: int) -> dict[str, Any]:
    """Steps 2 and 3: put -> run created, polling at the default interval, then pushed through a webhook."""
    client = s3.client()
    inbox, outbox = "s3://assets/inbox", "s3://assets/outbox"
    settings = Settings(inbox=inbox, outbox=outbox, state_dir=state / "poll", **base)
    summary: dict[str, Any] = {"poll_seconds": settings.poll_seconds, "settle_seconds": settings.settle_seconds}
    watcher, stop, close = start_watcher(settings)
    rows = latency(client, "assets", "poll", jobs, "polling")
    stop_watcher(watcher, stop, close)

    # moto S3 -> SNS -> HTTP subscription -> webhook (polling every 120 s behind it)
    port = free_port()
    settings = Settings(inbox=inbox, outbox=outbox, state_dir=state / "hook", poll_seconds=120,
                        webhook_port=port, webhook_token=TOKEN, **base)
    watcher, stop, close = start_watcher(settings)
    sns = boto3.client("sns", endpoint_url=s3.url, region_name=s3.region,
                       aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key)
    topic = sns.create_topic(Name="assets-events")["TopicArn"]
    sns.subscribe(TopicArn=topic, Protocol="http", Endpoint=f"http://sns:{TOKEN}@127.0.0.1:{port}/sns")
    client.set_bucket_notification("assets", NotificationConfig(topic_config_list=[TopicConfig(
        ["s3:ObjectCreated:*"], config_id="i2vflow", topic=topic, prefix_filter_rule=PrefixFilterRule("inbox/"))]))
    time.sleep(1)
    rows += latency(client, "assets", "hook", jobs, "webhook")
    stop_watcher(watcher, stop, close)
    client.delete_bucket_notification("assets")
    summary["latency"] = rows
    for mode in ("polling", "webhook"):
        values = [r["put_to_run_created_s"] for r in rows if r["mode"] == mode]
        summary[f"{mode}_put_to_run_created_s"] = {
            "median": round(statistics.median(values), 3), "min": min(values), "max": max(values)}
    return summary


def outage(moto: Moto, base: dict[str, Any], state: Path, down: float) -> dict[str, Any]:
    """Step 4: the S3 server goes away while a run is running, then comes back on its port."""
    s3 = moto.info
    settings = Settings(inbox="s3://assets/inbox", outbox="s3://assets/outbox", state_dir=state / "outage", **base)
    watcher, stop, close = start_watcher(settings)
    put_job(s3.client(), "assets", "outage-0", 0)
    run = run_created("outage-0")
    wait_state(run.id, lambda s: s.is_running())
    moto.stop()
    down_at = time.monotonic()
    time.sleep(down)
    moto.start()
    up_at = time.monotonic()
    scans_before = _scan_count(watcher)
    fresh = make_client(s3.endpoint, s3.access_key, s3.secret_key, region=s3.region)
    put_at = put_job(fresh, "assets", "after-0", 1)
    after = run_created("after-0", timeout=180)
    relisted = time.monotonic()
    first = wait_state(run.id, lambda s: s.is_final())
    second = wait_state(after.id, lambda s: s.is_final())
    outputs = sorted(o.object_name for o in fresh.list_objects("assets", prefix="outbox/", recursive=True)
                     if "outage" in (o.object_name or "") or "after" in (o.object_name or ""))
    stop_watcher(watcher, stop, close)
    return {
        "down_s": round(up_at - down_at, 1),
        "run_in_flight_final_state": f"{first.type.value}: {(first.message or '')[:300]}",
        "restart_to_next_job_run_created_s": round(relisted - up_at, 2),
        "put_after_restart_to_run_created_s": round(after.created.timestamp() - put_at, 2),
        "job_after_restart_final_state": second.type.value,
        "outputs": outputs,
        "watcher_scans_during_recovery": scans_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--down", type=float, default=60.0, help="seconds the S3 server stays down")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bucket-cpu.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="i2vflow-bench-bucket-"))
    state = work / "state"
    moto = Moto(free_port())
    moto.start()
    base = moto.info.settings_kwargs()
    summary: dict[str, Any] = {"cpus": os.cpu_count()}
    summary["listing"] = listing_cost(moto, args.objects, base, work)
    print(json.dumps(summary["listing"]), flush=True)

    sup = Supervisor(env=prefect_env("", state), log_dir=state / "logs")
    try:
        start_stack(sup, moto.info, work, state)
        moto.info.client().make_bucket("assets")
        summary.update(polling_and_push_latency(moto.info, base, state, args.jobs))
        summary["restart"] = outage(moto, base, state, args.down)
    finally:
        sup.stop()
        if moto.server is not None:
            moto.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "latency"}, indent=2))


def _scan_count(watcher: Any) -> str:
    return f"back-off now {watcher._backoff:.0f} s"


if __name__ == "__main__":
    main()
