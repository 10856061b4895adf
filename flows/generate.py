"""Flow: one dropped job becomes one video (or one error report).

Why a flow per job: each drop is visible in the Prefect UI as its own run, named after the
input (``shoe-3f2a9c``), with its own logs, retries and artifacts. The flow only orchestrates:
validate the inputs, render and encode on the warm GPU worker, publish.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

import structlog
from prefect import flow, runtime, tags
from prefect.states import Cancelled, Completed, Failed, State
from prefect.utilities.urls import url_for

from infra.jobs import JobTicket, RenderHandover
from infra.logging import configure_logging
from infra.orchestrator import cancel_task_run
from infra.settings import Settings, get_settings
from infra.spec import BadInputError
from tasks.inputs import InputChangedError, PreparedJob, load_inputs, prepare_job
from tasks.publish import build_sidecar, publish_video, write_error_report
from tasks.render import (
    OrphanedRender,
    RenderedVideo,
    RenderFailed,
    await_render,
    defer_render,
    render_failure_report,
    render_video,
)


@flow(name="generate-video", log_prints=False, retries=0)
def generate_video(ticket: JobTicket, handover: RenderHandover | None = None) -> State:
    """1. load and validate inputs, 2. render and encode the MP4 on the GPU worker (await the
    render the watcher handed over, if it is this job's), 3. publish video and sidecar.
    Bad input ends the run with an error file, no retries."""
    settings = get_settings()
    configure_logging(settings.resolved_log_file)
    log = structlog.get_logger("i2vflow.flow").bind(job_id=ticket.job_id, input_key=ticket.stem)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        job = _timed(timings, "load_inputs", load_inputs, ticket)
        rendered = _timed(timings, "render", render_on_gpu_worker, job, settings.render_timeout_seconds, handover)
    except BadInputError as exc:
        _drop_handover(handover, "the flow found the job's input bad")
        write_error_report(ticket, exc.report)
        return Failed(message=f"bad input: {exc.report.message}")
    except InputChangedError as exc:
        _drop_handover(handover, "the job's input changed after detection")
        log.info("job.superseded", reason=str(exc))
        return Cancelled(message=str(exc))
    except RenderFailed as exc:
        write_error_report(ticket, render_failure_report(exc))
        return Failed(message=f"render failed: {exc}")
    # Anything else (store or server unreachable, a GPU worker lost repeatedly) is the
    # operator's problem, not the user's: the run fails loudly and the reconciler retries it.
    timings["total_before_publish"] = round(time.perf_counter() - started, 3)
    sidecar = publish_video(ticket, rendered.video, build_sidecar(ticket, job, rendered, timings))
    log.info("job.done", video_key=sidecar["video"]["key"], seconds=timings,
             render_task_run_id=rendered.engine["task_run_id"],
             handed_over=handover is not None and rendered.engine["task_run_id"] == handover.task_run_id)
    return Completed(message=f"video {sidecar['video']['url']}", data=sidecar)


def hand_over_render(ticket: JobTicket, settings: Settings, client: Any = None) -> RenderHandover | None:
    """Called by the watcher as it submits a job (``early_render``), with its kept-open API
    ``client``: validate the inputs as the flow will and hand the render to the GPU worker now,
    so it runs while the flow run is being claimed and started. None where the flow must decide
    (bad or changed input: it reports it)."""
    try:
        job = prepare_job(ticket, settings)
    except (BadInputError, InputChangedError):
        return None
    # Keyed by the job: a second watcher, or this one restarted, gets the same render back.
    task_run_id = defer_render(job, f"handover-{ticket.job_id}", client)
    return RenderHandover(task_run_id=task_run_id, job_digest=job.digest())


def render_on_gpu_worker(job: PreparedJob, timeout: float, handover: RenderHandover | None = None,
                         resubmits: int = 2) -> RenderedVideo:
    """Await the render handed over at detection if it is this job's; otherwise (or if it was
    lost) hand the render to the warm GPU worker; if that worker dies mid-render, submit again."""
    if handover is not None:
        rendered = _await_handover(job, handover, timeout)
        if rendered is not None:
            return rendered
    for attempt in range(resubmits + 1):
        with tags(f"model:{job.model}"):
            future = render_video.delay(job)
        try:
            return await_render(future, timeout)
        except OrphanedRender:
            if attempt == resubmits:
                raise
    raise AssertionError("unreachable")


def _await_handover(job: PreparedJob, handover: RenderHandover, timeout: float) -> RenderedVideo | None:
    """The handed-over render's video, or None where the flow must render itself: the watcher
    validated other settings than this flow did, or the render ended without a video
    (cancelled, crashed, its worker lost). Its RenderFailed is the job's on the run's first try
    (a retried run renders anew), and a timeout the operator's: both propagate as they would
    for the flow's own render."""
    from prefect.futures import PrefectDistributedFuture

    log = structlog.get_logger("i2vflow.flow").bind(job_id=job.job_id, render_task_run_id=handover.task_run_id)
    if handover.job_digest != job.digest():
        _drop_handover(handover, "the flow validated the job differently from the watcher")
        log.warning("render.handover_refused", reason="job digest differs")
        return None
    # Its logs are the render task run's own, not this flow run's: say where they are.
    log.info("render.handed_over", render_task_run_url=url_for("task-run", obj_id=handover.task_run_id))
    try:
        return await_render(PrefectDistributedFuture(UUID(handover.task_run_id)), timeout)
    except RenderFailed:
        if runtime.flow_run.run_count > 1:
            log.info("render.handover_failed_before", run_count=runtime.flow_run.run_count)
            return None
        raise
    except TimeoutError:
        raise
    except Exception as exc:
        log.warning("render.handover_lost", error=repr(exc)[:500])
        return None


def _drop_handover(handover: RenderHandover | None, reason: str) -> None:
    if handover is not None:
        cancel_task_run(handover.task_run_id, reason)


def _timed(timings: dict[str, float], name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    start = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        timings[name] = round(time.perf_counter() - start, 3)


if __name__ == "__main__":
    generate_video.serve(name="generate-video")
