"""Flow: one dropped job becomes one video (or one error report).

Why a flow per job: each drop is visible in the Prefect UI as its own run, named after the
input (``shoe-3f2a9c``), with its own logs, retries and artifacts. The flow only orchestrates:
validate the inputs, render and encode on the warm GPU worker, publish.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from prefect import flow, tags
from prefect.states import Cancelled, Completed, Failed, State

from infra.jobs import JobTicket
from infra.logging import configure_logging
from infra.settings import get_settings
from infra.spec import BadInputError
from tasks.inputs import InputChangedError, PreparedJob, load_inputs
from tasks.publish import build_sidecar, publish_video, write_error_report
from tasks.render import (
    OrphanedRender,
    RenderedVideo,
    RenderFailed,
    await_render,
    render_failure_report,
    render_video,
)


@flow(name="generate-video", log_prints=False, retries=0)
def generate_video(ticket: JobTicket) -> State:
    """1. load and validate inputs, 2. render and encode the MP4 on the GPU worker,
    3. publish video and sidecar. Bad input ends the run with an error file, no retries."""
    settings = get_settings()
    configure_logging(settings.resolved_log_file)
    log = structlog.get_logger("i2vflow.flow").bind(job_id=ticket.job_id, input_key=ticket.stem)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        job = _timed(timings, "load_inputs", load_inputs, ticket)
        rendered = _timed(timings, "render", render_on_gpu_worker, job, settings.render_timeout_seconds)
    except BadInputError as exc:
        write_error_report(ticket, exc.report)
        return Failed(message=f"bad input: {exc.report.message}")
    except InputChangedError as exc:
        log.info("job.superseded", reason=str(exc))
        return Cancelled(message=str(exc))
    except RenderFailed as exc:
        write_error_report(ticket, render_failure_report(exc))
        return Failed(message=f"render failed: {exc}")
    # Anything else (store or server unreachable, a GPU worker lost repeatedly) is the
    # operator's problem, not the user's: the run fails loudly and the reconciler retries it.
    timings["total_before_publish"] = round(time.perf_counter() - started, 3)
    sidecar = publish_video(ticket, rendered.video, build_sidecar(ticket, job, rendered, timings))
    log.info("job.done", video_key=sidecar["video"]["key"], seconds=timings)
    return Completed(message=f"video {sidecar['video']['url']}", data=sidecar)


def render_on_gpu_worker(job: PreparedJob, timeout: float, resubmits: int = 2) -> RenderedVideo:
    """Hand the render to the warm GPU worker; if that worker dies mid-render, submit again."""
    for attempt in range(resubmits + 1):
        with tags(f"model:{job.model}"):
            future = render_video.delay(job)
        try:
            return await_render(future, timeout)
        except OrphanedRender:
            if attempt == resubmits:
                raise
    raise AssertionError("unreachable")


def _timed(timings: dict[str, float], name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    start = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        timings[name] = round(time.perf_counter() - start, 3)


if __name__ == "__main__":
    generate_video.serve(name="generate-video")
