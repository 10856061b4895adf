"""Prometheus metrics of the watcher and the GPU worker, and the one function that serves them.

Why this shape: the instrumented code calls one small function each (``observe_scan``,
``observe_render``), and everything else lives here. Names follow Prometheus conventions: the
``i2vflow_`` prefix, base units in the name (``_seconds``, ``_bytes``), ``_total`` on counters,
labels with a small fixed set of values.

Where each number is observed (docs/operations.md says why):
- the watcher: jobs detected, runs created, submit errors, ledger states and queue depth, at
  every scan; and, in a background poller, the outcomes of runs (videos published, failures by
  reason, end-to-end latency) read from the Prefect server's events, plus the scheduled,
  pending and running flow runs of the deployment. Flow runs live in short processes that
  nothing scrapes; the events they already emit are the durable record of what happened.
- the GPU worker: render latency, model loads, OOM fallbacks, render errors, GPU and process
  memory (read at scrape time, so the numbers are current).
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from infra.ledger import Ledger

try:  # no `_created` series: they double the series count and no dashboard here uses them
    from prometheus_client import disable_created_metrics

    disable_created_metrics()
except ImportError:  # pragma: no cover - older prometheus-client
    pass

log = structlog.get_logger("i2vflow.metrics")

LATENCY_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
RENDER_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)

# --- watcher ---------------------------------------------------------------------------------
JOBS_DETECTED = Counter("i2vflow_jobs_detected_total", "New jobs recorded in the ledger (settled, paired, "
                        "new content).")
RUNS_CREATED = Counter("i2vflow_runs_created_total", "Flow runs created (or found by idempotency key) for jobs.")
SUBMIT_ERRORS = Counter("i2vflow_submit_errors_total", "Failed attempts to create a flow run (the job is kept).")
QUEUE_DEPTH = Gauge("i2vflow_queue_depth", "Jobs waiting, by state: ledger detected/submitting; Prefect "
                    "scheduled/pending/running flow runs of the deployment.", ["state"])
LEDGER_JOBS = Gauge("i2vflow_ledger_jobs", "Jobs in the ledger, by state (all time).", ["state"])
LAST_SCAN = Gauge("i2vflow_last_scan_timestamp_seconds", "Unix time of the watcher's last completed scan.")


@dataclass(frozen=True)
class OutcomeSeries:
    """The outcome poller's series. A process has one set, on the default registry; a test gives
    each of two pollers its own registry, as two watcher processes would have."""

    videos: Counter
    failures: Counter
    end_to_end: Histogram
    poll_errors: Counter


def outcome_series(registry: CollectorRegistry = REGISTRY) -> OutcomeSeries:
    return OutcomeSeries(
        Counter("i2vflow_videos_published_total", "Videos published to the outbox (from Prefect events).",
                registry=registry),
        Counter("i2vflow_failures_total", "Jobs that ended without a video, by reason (error file code or "
                "'crashed').", ["reason"], registry=registry),
        Histogram("i2vflow_end_to_end_seconds", "Job detected (ledger) to video published (event).",
                  buckets=LATENCY_BUCKETS, registry=registry),
        Counter("i2vflow_outcome_poll_errors_total", "Failed reads of run outcomes from the Prefect server.",
                registry=registry))


OUTCOMES = outcome_series()
VIDEOS_PUBLISHED, FAILURES, END_TO_END, POLL_ERRORS = (OUTCOMES.videos, OUTCOMES.failures, OUTCOMES.end_to_end,
                                                       OUTCOMES.poll_errors)

# --- GPU worker ------------------------------------------------------------------------------
RENDER_SECONDS = Histogram("i2vflow_render_seconds", "Time on the model per render (model loading excluded).",
                           buckets=RENDER_BUCKETS)
OOM_FALLBACKS = Counter("i2vflow_oom_fallbacks_total", "Renders that ran out of GPU memory and were retried with "
                        "CPU offload.")
RENDER_ERRORS = Counter("i2vflow_render_errors_total", "Renders that raised, by exception class.", ["error"])

LEDGER_QUEUE_STATES = ("detected", "submitting")
PREFECT_QUEUE_STATES = {"scheduled": "SCHEDULED", "pending": "PENDING", "running": "RUNNING"}
_LEDGER_REFRESH_SECONDS = 5.0
_ledger_refreshed = 0.0
_servers: dict[int, Any] = {}
_servers_lock = threading.Lock()


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Serve ``/metrics`` of this process on ``port`` (0: disabled). Returns the port, or 0.

    Once per port per process; a port taken by another process is logged, not fatal: losing
    metrics must never stop the watcher or the GPU worker.
    """
    if not port:
        return 0
    with _servers_lock:
        if port in _servers:
            return port
        try:
            _servers[port] = start_http_server(port, addr=host)
        except OSError as exc:
            log.warning("metrics.unavailable", port=port, host=host, error=str(exc))
            return 0
    log.info("metrics.serving", url=f"http://{host}:{port}/metrics")
    return port


def stop_metrics_server(port: int) -> None:
    with _servers_lock:
        started = _servers.pop(port, None)
    if isinstance(started, tuple):  # prometheus-client >= 0.20 returns (server, thread)
        started[0].shutdown()
        started[0].server_close()


# --- watcher hooks -----------------------------------------------------------------------------
def observe_scan(report: Any, ledger_counts: Callable[[], dict[str, int]]) -> None:
    """After each scan: counters from the ScanReport; ledger gauges at most every 5 s
    (a GROUP BY over a ledger that grows for months is cheap, but not free)."""
    global _ledger_refreshed
    JOBS_DETECTED.inc(report.new_jobs)
    RUNS_CREATED.inc(report.submitted)
    SUBMIT_ERRORS.inc(report.submit_errors)
    now = time.monotonic()
    LAST_SCAN.set(time.time())
    if now - _ledger_refreshed < _LEDGER_REFRESH_SECONDS and not (report.new_jobs or report.submitted):
        return
    _ledger_refreshed = now
    counts = ledger_counts()
    for state in {*counts, *LEDGER_QUEUE_STATES, "submitted"}:
        LEDGER_JOBS.labels(state=state).set(counts.get(state, 0))
    for state in LEDGER_QUEUE_STATES:
        QUEUE_DEPTH.labels(state=state).set(counts.get(state, 0))


def _reason(value: object) -> str:
    """Error codes are a small fixed set (invalid_spec, invalid_image, render_failed ...);
    anything else is folded into 'other' so a label never explodes."""
    text = str(value or "other")
    ok = text.isascii() and len(text) <= 40 and all(c.islower() or c.isdigit() or c == "_" for c in text)
    return text if ok else "other"


class OutcomePoller:
    """Reads what became of the runs (videos, failures, latency) from the Prefect server.

    Every ``interval`` seconds: events ``i2vflow.video.published`` and ``i2vflow.job.failed``
    about this watcher's inbox, and ``prefect.flow-run.Crashed`` of runs this ledger submitted
    for it, since the poller started. Events are persisted asynchronously, so each read looks
    back ``lookback`` seconds and skips event ids already counted. Also sets the Prefect part
    of ``i2vflow_queue_depth``.

    Exactly one count per outcome: every watcher on the inbox sees every event, so an event is
    counted only by the poller that first claims its id in the shared ledger. Not "the watcher
    that submitted the job": that one may have restarted (new owner id) or died since, and the
    outcome would be counted by nobody; the first claim is made by whichever watcher is alive.
    """

    EVENTS = ("i2vflow.video.published", "i2vflow.job.failed", "prefect.flow-run.Crashed")
    CLAIM_DAYS = 1.0  # claims outlive any look-back (minutes), even after a long server outage

    def __init__(self, inbox_location: str, deployment: str, ledger: Ledger,
                 interval: float = 15.0, lookback: float = 120.0, series: OutcomeSeries = OUTCOMES) -> None:
        self.inbox_location = inbox_location
        self.deployment = deployment
        self.ledger = ledger
        self.interval = interval
        self.lookback = lookback
        self.series = series
        self.started = datetime.now(UTC)
        self._seen: dict[str, datetime] = {}
        self._cursor = self.started
        self._deployment_id: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> OutcomePoller:
        self._thread = threading.Thread(target=self._run, name="metrics-outcomes", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll_once()

    def poll_once(self) -> None:
        try:
            from prefect import get_client

            with get_client(sync_client=True) as client:
                for event in self._events(client):
                    self._count(event)
                self._queue_depth(client)
            self.ledger.forget_events(time.time() - self.CLAIM_DAYS * 86400)
        except Exception as exc:  # the server may be down; the next poll catches up (lookback)
            self.series.poll_errors.inc()
            log.warning("metrics.poll_failed", error=repr(exc)[:300])

    def _events(self, client: Any) -> Iterator[Any]:
        from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventOrder

        since = max(self.started, self._cursor - timedelta(seconds=self.lookback))
        page = client.read_events(EventFilter(
            occurred=EventOccurredFilter(since=since, until=datetime.now(UTC) + timedelta(minutes=5)),
            event=EventNameFilter(name=list(self.EVENTS)), order=EventOrder.ASC), limit=50)  # the API allows 50 a page
        while True:
            for event in page.events:
                key = str(event.id)
                if key in self._seen or event.occurred < self.started:
                    continue
                self._seen[key] = event.occurred
                self._cursor = max(self._cursor, event.occurred)
                yield event
            if not page.next_page:
                break
            page = client.read_events_page(page.next_page)
        horizon = self._cursor - timedelta(seconds=3 * self.lookback)
        self._seen = {key: at for key, at in self._seen.items() if at >= horizon}

    def _count(self, event: Any) -> None:
        name, payload = event.event, event.payload or {}
        if name == "prefect.flow-run.Crashed":
            # Scoped by the ledger, not the deployment: watchers of other inboxes share the deployment.
            ticket = self.ledger.job_of_run(event.resource.id.removeprefix("prefect.flow-run."))
            if ticket is None or ticket.inbox != self.inbox_location:
                return
        elif event.resource.get("i2vflow.inbox") != self.inbox_location:
            return  # another watcher's job
        if not self.ledger.claim_event(str(event.id)):
            return  # another watcher on this ledger counted it
        if name == "prefect.flow-run.Crashed":
            self.series.failures.labels(reason="crashed").inc()
        elif name == "i2vflow.job.failed":
            self.series.failures.labels(reason=_reason(payload.get("error"))).inc()
        else:
            self.series.videos.inc()
            detected = self.ledger.detected_at(str(payload.get("job_id", "")))
            if detected is not None:
                self.series.end_to_end.observe(max(0.0, event.occurred.timestamp() - detected))

    def _queue_depth(self, client: Any) -> None:
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterDeploymentId,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        if self._deployment_id is None:
            self._deployment_id = str(client.read_deployment_by_name(self.deployment).id)
        for label, state_type in PREFECT_QUEUE_STATES.items():
            count = client.count_flow_runs(flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[self._deployment_id]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(state_type)]))))
            QUEUE_DEPTH.labels(state=label).set(count)


# --- GPU worker --------------------------------------------------------------------------------
def observe_render(result: Any) -> None:
    """After a render on the GPU worker: its time on the model and whether the OOM ladder ran."""
    RENDER_SECONDS.observe(result.render_seconds)
    if result.oom_fallback_used:
        OOM_FALLBACKS.inc()


def observe_render_error(exc: BaseException) -> None:
    RENDER_ERRORS.labels(error=type(exc).__name__[:60]).inc()


class GpuWorkerCollector(Collector):
    """Numbers read at scrape time: model loads (the engine's own count, warm-up included),
    GPU memory (PyTorch's allocator and the device), and this process's memory."""

    def __init__(self, model_loads: Callable[[], int], device_index: int = 0) -> None:
        self.model_loads = model_loads
        self.device_index = device_index

    def collect(self) -> Iterator[Any]:
        loads = CounterMetricFamily("i2vflow_model_loads", "Model loads in this GPU worker (start-up included).")
        loads.add_metric([], self.model_loads())
        yield loads
        gpu = GaugeMetricFamily("i2vflow_gpu_memory_bytes", "GPU memory: used/peak/reserved by PyTorch in this "
                                "worker; device_used/total of the whole card.", labels=["kind"])
        for kind, value in gpu_memory(self.device_index).items():
            gpu.add_metric([kind], value)
        yield gpu
        proc = GaugeMetricFamily("i2vflow_process_memory_bytes", "This worker's resident memory (rss) and its "
                                 "peak (peak_rss): the memory figure on CPU-only hosts.", labels=["kind"])
        for kind, value in process_memory().items():
            proc.add_metric([kind], value)
        yield proc


def gpu_memory(device_index: int = 0) -> dict[str, float]:
    """PyTorch's view of GPU memory; empty without CUDA (or before CUDA was first used, so a
    scrape never creates a CUDA context of its own)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    device = torch.device("cuda", device_index)
    free, total = torch.cuda.mem_get_info(device)
    return {
        "used": float(torch.cuda.memory_allocated(device)),
        "peak": float(torch.cuda.max_memory_allocated(device)),
        "reserved": float(torch.cuda.memory_reserved(device)),
        "device_used": float(total - free),
        "total": float(total),
    }


def process_memory() -> dict[str, float]:
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    try:
        with open("/proc/self/statm") as handle:
            rss = int(handle.read().split()[1]) * resource.getpagesize()
    except OSError:
        import psutil

        rss = psutil.Process().memory_info().rss
    return {"rss": float(rss), "peak_rss": float(max(rss, peak_kib * 1024))}


_gpu_collector: GpuWorkerCollector | None = None


def register_gpu_worker_metrics(model_loads: Callable[[], int], device: str = "auto") -> None:
    """Add the scrape-time GPU worker numbers to the registry (once per process)."""
    global _gpu_collector
    if _gpu_collector is not None:
        return
    index = int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0
    _gpu_collector = GpuWorkerCollector(model_loads, index)
    REGISTRY.register(_gpu_collector)
