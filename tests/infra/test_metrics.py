"""The metrics endpoints, scraped over real HTTP.

The watcher scans real folders with a recorder standing in for the Prefect submission (as in
tests/infra/watch/test_service.py); the outcome poller reads real events from the session's
Prefect server; the whole chain (drop -> video -> GPU worker and watcher numbers) runs on the
real service. Metrics are process-wide, so every assertion is about how much a value moved.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import urllib.request
import uuid
from pathlib import Path

import pytest
from prefect import get_client
from prefect.events import emit_event
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from infra import metrics
from infra.jobs import JobTicket
from infra.ledger import Ledger
from infra.orchestrator import emit_job_event
from infra.service import PROJECT_ROOT
from infra.settings import Settings
from infra.store.folder import FolderStore
from infra.watch.folder import start_folder_hints
from infra.watch.service import Watcher
from tests.helpers import FAST_SPEC, drop, png_bytes, wait_for
from tests.infra.watch.test_service import Recorder
from tests.ports import free_port

NAME = re.compile(r"^i2vflow_[a-z0-9_]+$")
LABEL = re.compile(r"^[a-z][a-z0-9_]*$")


def scrape(port: int) -> dict[str, float]:
    """``{'name{label="v"}': value}`` from a real GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


@pytest.fixture
def metrics_port():
    port = metrics.start_metrics_server(free_port())
    assert port
    yield port
    metrics.stop_metrics_server(port)


@pytest.fixture
def watcher(tmp_path: Path):
    inbox, recorder = tmp_path / "in", Recorder()
    inbox.mkdir()
    settings = Settings(inbox=str(inbox), outbox=str(tmp_path / "out"), state_dir=tmp_path / "st",
                        rescan_seconds=0.3, settle_seconds=0.1)
    watcher = Watcher(settings, FolderStore(inbox), str(inbox), str(tmp_path / "out"),
                      Ledger(settings.ledger_path), recorder.submit, lambda *_: None)
    watcher.recorder = recorder  # type: ignore[attr-defined]
    observer = start_folder_hints(inbox, watcher.wake)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    yield watcher
    stop.set()
    thread.join(10)
    observer.stop()
    watcher.ledger.close()


def test_watcher_counters_and_queue_depth_move_with_real_scans(watcher, metrics_port: int) -> None:
    inbox, recorder = Path(watcher.inbox_location), watcher.recorder
    before = scrape(metrics_port)
    for stem in ("a", "b", "c"):
        drop(inbox, stem, {"prompt": stem}, png_bytes())
    wait_for(lambda: len(recorder.calls) == 3, timeout=20, what="3 submissions")
    after = wait_for(lambda: (s := scrape(metrics_port))["i2vflow_runs_created_total"]
                     - before.get("i2vflow_runs_created_total", 0) >= 3 and s, timeout=10)
    assert after["i2vflow_jobs_detected_total"] - before.get("i2vflow_jobs_detected_total", 0) >= 3
    assert after['i2vflow_ledger_jobs{state="submitted"}'] >= 3
    assert after['i2vflow_queue_depth{state="detected"}'] == 0
    assert after["i2vflow_last_scan_timestamp_seconds"] > before.get("i2vflow_last_scan_timestamp_seconds", 0)

    recorder.down = True  # the server is away: the job waits in the ledger, errors are counted
    drop(inbox, "d", {"prompt": "d"}, png_bytes())
    down = wait_for(lambda: (s := scrape(metrics_port))["i2vflow_submit_errors_total"]
                    > after["i2vflow_submit_errors_total"] and s, timeout=20, what="a submit error")
    assert down['i2vflow_queue_depth{state="detected"}'] == 1
    recorder.down = False
    wait_for(lambda: len(recorder.calls) == 4, timeout=90, what="the retried submission")  # after back-off


def test_names_and_labels_follow_prometheus_conventions(metrics_port: int) -> None:
    metrics.register_gpu_worker_metrics(lambda: 0)  # what a GPU worker adds at scrape time
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        families = [f for f in text_string_to_metric_families(response.read().decode())
                    if f.name.startswith("i2vflow")]
    names = {f.name: f for f in families}
    expected = {"i2vflow_jobs_detected", "i2vflow_runs_created", "i2vflow_videos_published", "i2vflow_failures",
                "i2vflow_queue_depth", "i2vflow_end_to_end_seconds", "i2vflow_render_seconds",
                "i2vflow_gpu_memory_bytes", "i2vflow_model_loads", "i2vflow_oom_fallbacks",
                "i2vflow_submit_errors", "i2vflow_process_memory_bytes"}
    assert expected <= set(names), expected - set(names)
    for family in families:
        assert NAME.match(family.name), family.name
        assert family.documentation, f"{family.name} has no help text"
        if family.type == "counter":
            assert all(s.name == f"{family.name}_total" for s in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        if "memory" in family.name:
            assert family.name.endswith("_bytes") and family.type == "gauge", family.name
        for sample in family.samples:
            assert all(LABEL.match(key) for key in sample.labels), sample
    assert names["i2vflow_model_loads"].type == "counter"


def _ticket(inbox: str, stem: str) -> JobTicket:
    return JobTicket(job_id=uuid.uuid4().hex, stem=stem, inbox=inbox, outbox="/nowhere",
                     image_key=f"{stem}.png", spec_key=f"{stem}.json")


def test_outcome_poller_counts_real_prefect_events_once(service, tmp_path: Path) -> None:
    """Published and failed events about this inbox are counted once each, with the
    detected->published latency from the ledger; another inbox's events are not."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    inbox = str(tmp_path / "inbox")
    poller = metrics.OutcomePoller(inbox, "generate-video/generate-video", ledger, lookback=60)
    published, failed, other = _ticket(inbox, "ok"), _ticket(inbox, "bad"), _ticket("/other/inbox", "x")
    ledger.record_detected(published)
    before = metrics.END_TO_END.collect()[0]
    count = {s.name: s.value for s in before.samples}["i2vflow_end_to_end_seconds_count"]
    videos, bad = metrics.VIDEOS_PUBLISHED._value.get(), metrics.FAILURES.labels(reason="invalid_spec")._value.get()
    emit_job_event("video.published", published, video_key="ok.mp4")
    emit_job_event("job.failed", failed, error="invalid_spec", message="m")
    emit_job_event("video.published", other, video_key="x.mp4")

    def polled() -> bool:
        poller.poll_once()
        return metrics.VIDEOS_PUBLISHED._value.get() - videos >= 1 and \
            metrics.FAILURES.labels(reason="invalid_spec")._value.get() - bad >= 1
    wait_for(polled, timeout=60, interval=1, what="the events to be counted")
    poller.poll_once()  # a second look at the same window counts nothing again
    poller.poll_once()
    assert metrics.VIDEOS_PUBLISHED._value.get() - videos == 1
    assert metrics.FAILURES.labels(reason="invalid_spec")._value.get() - bad == 1
    samples = {s.name: s.value for s in metrics.END_TO_END.collect()[0].samples}
    assert samples["i2vflow_end_to_end_seconds_count"] - count == 1
    ledger.close()


def test_queue_depth_counts_the_deployments_runs_waiting_for_a_worker(service, tmp_path: Path) -> None:
    """Flow runs nobody has picked up yet are i2vflow_queue_depth{state="scheduled"}, read from Prefect."""
    def prefect(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "prefect", *args], env=service.env, cwd=PROJECT_ROOT,
                       check=True, capture_output=True, timeout=180)

    prefect("work-pool", "create", "i2vflow-queue-idle", "--type", "process")  # a pool no worker serves
    prefect("--no-prompt", "deploy", "flows.generate.generate_video", "--name", "queue-depth",
            "--pool", "i2vflow-queue-idle")
    inbox = str(tmp_path / "inbox")
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("generate-video/queue-depth")
        for stem in ("a", "b", "c"):
            client.create_flow_run_from_deployment(deployment.id,
                                                   parameters={"ticket": _ticket(inbox, stem).model_dump(mode="json")})
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    metrics.OutcomePoller(inbox, "generate-video/queue-depth", ledger, lookback=60).poll_once()
    assert metrics.QUEUE_DEPTH.labels(state="scheduled")._value.get() == 3
    assert metrics.QUEUE_DEPTH.labels(state="running")._value.get() == 0
    ledger.close()


def _scrape_registry(registry: CollectorRegistry) -> dict[str, float]:
    """What GET /metrics of a process owning ``registry`` would answer, parsed like ``scrape``."""
    values = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_two_watchers_on_one_ledger_count_each_outcome_once(service, tmp_path: Path) -> None:
    """Two watchers on one inbox share its ledger (a connection each, as two processes have) and
    each exports its own registry: summed over both, every video, failure, crash and latency
    is counted exactly once, though both pollers read every event, at the same moments."""
    inbox, path = str(tmp_path / "inbox"), tmp_path / "state" / "ledger.sqlite3"
    ledgers = [Ledger(path), Ledger(path)]
    registries = [CollectorRegistry(), CollectorRegistry()]
    pollers = [metrics.OutcomePoller(inbox, "generate-video/generate-video", ledger, lookback=60,
                                     series=metrics.outcome_series(registry))
               for ledger, registry in zip(ledgers, registries, strict=True)]
    jobs = [_ticket(inbox, f"job{index}") for index in range(12)]
    for ticket in jobs:
        ledgers[0].record_detected(ticket)
    crashed_run = str(uuid.uuid4())
    ledgers[1].mark_submitted(jobs[-1].job_id, crashed_run)
    for ticket in jobs[:9]:
        emit_job_event("video.published", ticket, video_key=f"{ticket.stem}.mp4")
    for ticket in jobs[9:]:
        emit_job_event("job.failed", ticket, error="invalid_spec", message="m")
    emit_event("prefect.flow-run.Crashed", resource={"prefect.resource.id": f"prefect.flow-run.{crashed_run}"})
    emit_event("prefect.flow-run.Crashed", resource={"prefect.resource.id": f"prefect.flow-run.{uuid.uuid4()}"})

    def poll_both() -> dict[str, float]:
        threads = [threading.Thread(target=poller.poll_once) for poller in pollers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        scrapes = [_scrape_registry(registry) for registry in registries]
        return {key: sum(s.get(key, 0) for s in scrapes) for key in {*scrapes[0], *scrapes[1]}}

    def total() -> dict[str, float] | None:
        sums = poll_both()  # a series shows only once its first event is counted: absent is 0, not yet
        done = (sums.get("i2vflow_videos_published_total", 0) >= 9
                and sums.get('i2vflow_failures_total{reason="crashed"}', 0) >= 1)
        return sums if done and sums.get('i2vflow_failures_total{reason="invalid_spec"}', 0) >= 3 else None
    wait_for(total, timeout=180, interval=1, what="the events to be counted")  # persisted late under load
    sums = poll_both()  # both look at the whole window again: nothing more is counted
    assert sums["i2vflow_videos_published_total"] == 9
    assert sums['i2vflow_failures_total{reason="invalid_spec"}'] == 3
    assert sums['i2vflow_failures_total{reason="crashed"}'] == 1  # the other crash is no run of this ledger
    assert sums["i2vflow_end_to_end_seconds_count"] == 9
    assert sums['i2vflow_end_to_end_seconds_bucket{le="+Inf"}'] == 9
    for ledger in ledgers:
        ledger.close()


@pytest.mark.e2e
def test_a_drop_shows_on_the_gpu_worker_and_watcher_endpoints(service, start_watcher, tmp_path: Path) -> None:
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    gpu_port = int(service.env["I2VFLOW_GPU_WORKER_METRICS_PORT"])
    gpu_before = wait_for(lambda: (s := _try_scrape(gpu_port)) and s["i2vflow_model_loads_total"] >= 1 and s,
                          timeout=180, what="the GPU worker's /metrics with the model loaded")
    handle = start_watcher(inbox, outbox)
    poller = metrics.OutcomePoller(str(inbox.resolve()), "generate-video/generate-video",
                                   handle.watcher.ledger, lookback=60)
    published = metrics.VIDEOS_PUBLISHED._value.get()
    drop(inbox, "metered", {"prompt": "p", **FAST_SPEC}, png_bytes())
    wait_for((outbox / "metered.json").exists, what="the video's sidecar")

    gpu = wait_for(lambda: (s := _try_scrape(gpu_port)) and s["i2vflow_render_seconds_count"]
                   > gpu_before["i2vflow_render_seconds_count"] and s, timeout=20, what="render counted")
    assert gpu["i2vflow_render_seconds_sum"] > gpu_before["i2vflow_render_seconds_sum"]
    assert gpu["i2vflow_model_loads_total"] == gpu_before["i2vflow_model_loads_total"]  # warm: no load per job
    assert gpu['i2vflow_process_memory_bytes{kind="rss"}'] > 50 * 2**20
    assert gpu["i2vflow_oom_fallbacks_total"] == 0

    def counted() -> bool:
        poller.poll_once()
        return metrics.VIDEOS_PUBLISHED._value.get() > published
    wait_for(counted, timeout=60, interval=1, what="the published event")
    samples = {s.name: s.value for s in metrics.END_TO_END.collect()[0].samples}
    assert samples["i2vflow_end_to_end_seconds_sum"] > 0


def _try_scrape(port: int) -> dict[str, float] | None:
    try:
        return scrape(port)
    except OSError:
        return None
