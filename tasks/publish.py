"""Tasks: deliver the video and its sidecar, or the error report, into the outbox.

Why the order: the MP4 goes first and the sidecar last, each written atomically, so a sidecar
in the outbox always means a whole video beside it. A stale ``NAME.error.json`` from an
earlier bad drop is removed once the fixed drop succeeds.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import structlog
from prefect import runtime, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.utilities.urls import url_for

from infra.engine.video import EncodedVideo
from infra.jobs import JobTicket
from infra.orchestrator import emit_job_event
from infra.settings import get_settings
from infra.spec import ErrorReport, error_file_bytes
from infra.store import open_store

if TYPE_CHECKING:  # types only: the GPU worker's and the flow's imports stay their own
    from tasks.inputs import PreparedJob
    from tasks.render import RenderedVideo

log = structlog.get_logger("i2vflow.publish")


def i2vflow_version() -> str:
    """The installed version, for the sidecar; a source checkout run without installing has
    none, and a job must not fail over it."""
    try:
        return version("i2vflow")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _artifact_key(ticket: JobTicket, kind: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", ticket.stem.lower()).strip("-")[:40] or "job"
    return f"{kind}-{slug}-{ticket.short_id}"


def build_sidecar(ticket: JobTicket, job: PreparedJob, rendered: RenderedVideo,
                  timings: dict[str, float]) -> dict[str, Any]:
    from infra.engine.registry import NOISE_WARNING

    engine, video = rendered.engine, rendered.video
    return {
        "i2vflow_version": i2vflow_version(),
        "job_id": ticket.job_id,
        "created_at": datetime.now(UTC).isoformat(),
        "inputs": {
            "image": {"key": ticket.image_key, "sha256": job.image_sha256},
            "spec": {"key": ticket.spec_key, "sha256": job.spec_sha256},
            "defaults": list(ticket.defaults_keys),
            "inbox": ticket.inbox,
        },
        "spec": job.spec.model_dump(),
        "model": {
            "name": engine["model_name"], "source": engine["model_source"],
            "is_noise": engine["is_noise"], "warning": NOISE_WARNING if engine["is_noise"] else None,
        },
        "seed": job.seed, "frames": video.frames, "fps": job.spec.fps,
        "width": video.width, "height": video.height,
        "timings_seconds": {**timings, "model_load": engine["load_seconds"],
                            "render_on_model": engine["render_seconds"],
                            "encode_on_gpu_worker": engine["encode_seconds"],
                            "waiting_for_gpu": engine["wait_seconds"]},
        "engine": {k: engine[k] for k in ("device", "dtype", "memory_mode", "pid", "model_loads_in_process",
                                          "oom_fallback_used", "speed", "steps_run",
                                          "steps_guided", "steps_cached")},
        # url_for gives the UI's current /runs/flow-run/<id> path (runtime.flow_run.ui_url is stale).
        # The render's task run is not nested under the flow run when the watcher handed it over.
        "prefect": {"flow_run_id": runtime.flow_run.id,
                    "flow_run_url": url_for("flow-run", obj_id=runtime.flow_run.id),
                    "render_task_run_id": engine["task_run_id"],
                    "render_task_run_url": url_for("task-run", obj_id=engine["task_run_id"])},
    }


@task(name="publish-video", retries=3, retry_delay_seconds=[2, 10, 30])
def publish_video(ticket: JobTicket, video: EncodedVideo, sidecar: dict[str, Any]) -> dict[str, Any]:
    """1. upload the MP4, 2. write the sidecar, 3. clear a stale error file, 4. artifacts, event."""
    settings = get_settings()
    outbox = open_store(ticket.outbox, settings)
    video_key, sidecar_key = ticket.output_key(".mp4"), ticket.output_key(".json")
    outbox.write(video_key, video.data, content_type="video/mp4")
    sidecar = {**sidecar, "video": {"key": video_key, "url": outbox.url(video_key), "bytes": video.bytes}}
    outbox.write(sidecar_key, json.dumps(sidecar, indent=2, default=str).encode(), "application/json")
    outbox.delete(ticket.output_key(".error.json"))
    _video_artifacts(ticket, outbox, video_key, sidecar)
    emit_job_event("video.published", ticket, video_key=video_key, url=outbox.url(video_key))
    log.info("video.published", job_id=ticket.job_id, input_key=ticket.stem, video_key=video_key)
    return sidecar


def _video_artifacts(ticket: JobTicket, outbox: Any, video_key: str, sidecar: dict[str, Any]) -> None:
    spec = sidecar["spec"]
    rows = "\n".join(f"| {k} | {v} |" for k, v in spec.items() if v is not None)
    warning = f"\n\n> **{sidecar['model']['warning']}**" if sidecar["model"].get("warning") else ""
    create_markdown_artifact(
        key=_artifact_key(ticket, "video"),
        markdown=f"# {ticket.stem}\n\nVideo: `{outbox.url(video_key)}`  \n"
        f"Model: `{sidecar['model']['name']}`, seed {sidecar['seed']}, "
        f"{sidecar['frames']} frames at {sidecar['fps']} fps, {sidecar['width']}x{sidecar['height']}"
        f"{warning}\n\n| parameter | value |\n| --- | --- |\n{rows}\n",
        description=f"i2vflow video for {ticket.stem}",
    )
    presign = getattr(outbox, "presigned_url", None)
    if presign is not None:
        from datetime import timedelta

        link = presign(video_key, timedelta(seconds=get_settings().presign_expiry_seconds))
        create_link_artifact(key=_artifact_key(ticket, "link"), link=link, link_text=video_key)


@task(name="write-error-report", retries=3, retry_delay_seconds=[2, 10, 30])
def write_error_report(ticket: JobTicket, report: ErrorReport) -> str:
    """Put ``NAME.error.json`` beside where the video would have gone; inputs stay untouched."""
    outbox = open_store(ticket.outbox, get_settings())
    key = ticket.output_key(".error.json")
    full = report.model_copy(update={
        "inputs": {"image": ticket.image_key, "spec": ticket.spec_key,
                   "defaults": ", ".join(ticket.defaults_keys) or None},
        "job_id": ticket.job_id,
        "flow_run_id": runtime.flow_run.id,
        "i2vflow_version": i2vflow_version(),
    })
    outbox.write(key, error_file_bytes(full), "application/json")
    emit_job_event("job.failed", ticket, error=report.error, message=report.message)
    log.warning("job.rejected", job_id=ticket.job_id, input_key=ticket.stem, error=report.error,
                message=report.message, report_key=key)
    return key
