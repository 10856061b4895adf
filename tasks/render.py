"""Task: render a job on the model and encode its MP4, inside the long-lived GPU task worker.

Why a task worker: a process worker starts a fresh Python process per flow run and would
load the model every time; ``i2vflow gpu-worker`` serves this task in one process that keeps
the pipeline warm. Tagged ``gpu`` (a concurrency limit keeps one render per GPU slot) and
``model:<name>`` (set by the flow). Transient failures retry with backoff; bad input never does.

Why encode here: the result crosses Prefect's result storage (a shared bucket between hosts),
and the MP4 is a small fraction of the raw frames (12.6 MB for 512x512x16). ffmpeg gets each
chunk of frames as the VAE decodes it, so the encode runs beside the decode; what is left of it
after the render runs while the worker's other slot keeps the GPU busy.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import structlog
from prefect import task
from pydantic import BaseModel, ConfigDict

from infra import metrics
from infra.engine.video import EncodedVideo, in_memory, temporary_mp4
from infra.spec import ErrorReport, FieldProblem
from tasks.inputs import PreparedJob

GPU_TAG = "gpu"


class RenderedVideo(BaseModel):
    """The verified MP4 and what produced it (the engine's account, with ``encode_seconds``: what
    the encode took after the render)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    video: EncodedVideo
    engine: dict[str, Any]


class RenderFailed(ValueError):
    """The model could not render this job (out of memory after the fallback, or inputs it
    refuses). Final: retrying the same job on the same worker cannot help, so no retries;
    the flow turns it into the job's error report."""


def render_failure_report(exc: RenderFailed) -> ErrorReport:
    problem = FieldProblem(field=None, problem=f"rendering failed: {type(exc).__name__}: {exc}"[:2000],
                           fix="smaller width/height or num_frames help with out-of-memory errors; "
                           "otherwise ask the operator (the run's logs in the Prefect UI say more)")
    return ErrorReport(error="render_failed", message=problem.problem, problems=[problem])


class OrphanedRender(RuntimeError):
    """The GPU worker executing this render stopped (no heartbeat); the render was crashed."""


def await_render(future: Any, timeout: float, check_every: float = 10.0, stale_after: float = 20.0) -> RenderedVideo:
    """The result of ``render_video.delay(...)``, waiting up to ``timeout`` seconds.

    Every ``check_every`` seconds without a result, the task run is checked: Running but claimed
    by no GPU-worker heartbeat fresher than ``stale_after`` means its worker died; it is marked
    Crashed (freeing its ``gpu`` slot) and OrphanedRender is raised so the caller resubmits.
    Prefect 3.9 may also read a just-deferred task run before its first state is recorded
    ("has no state ... hasn't started yet"): a race, not a failure, so it asks again.
    """
    deadline = time.monotonic() + timeout
    while True:
        wait = max(1.0, min(check_every, deadline - time.monotonic()))
        try:
            return future.result(timeout=wait)
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise
            _crash_if_orphaned(str(future.task_run_id), stale_after)
        except RuntimeError as exc:
            if "has no state" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _crash_if_orphaned(task_run_id: str, stale_after: float) -> None:
    from prefect import get_client
    from prefect.states import Crashed

    from infra.heartbeat import claimed_task_runs

    with get_client(sync_client=True) as client:
        task_run = client.read_task_run(task_run_id)
        if task_run.state is None or not task_run.state.is_running():
            return  # queued: waiting for a worker is not an orphan
        started = task_run.state.timestamp.timestamp()
        if time.time() - started < stale_after or task_run_id in claimed_task_runs(stale_after):
            return
        client.set_task_run_state(task_run_id, Crashed(message="GPU worker stopped (no heartbeat)"), force=True)
    structlog.get_logger("i2vflow.render").warning("render.orphaned", task_run_id=task_run_id)
    raise OrphanedRender(f"render task run {task_run_id} lost its GPU worker; resubmitting")


def warmup_requests(model: str, shapes: str) -> list[Any]:
    """Two-step renders at the shapes jobs will use, run when the GPU worker starts, so
    compilation and first-call costs are paid before the first job, not inside it.
    ``shapes`` is "WxHxF,..." or empty for the model's default square at 16 frames."""
    from PIL import Image

    from infra.engine.engine import RenderRequest
    from tasks.inputs import DEFAULT_SHORT_SIDE, FALLBACK_SHORT_SIDE

    side = DEFAULT_SHORT_SIDE.get(model, FALLBACK_SHORT_SIDE)
    parsed = [tuple(int(n) for n in shape.lower().split("x")) for shape in shapes.split(",") if shape.strip()]
    return [RenderRequest(image=Image.new("RGB", (width, height), (128, 128, 128)), prompt="warm-up",
                          negative_prompt=None, num_frames=frames, fps=8, steps=2, guidance_scale=9.0,
                          width=width, height=height, seed=0, model=model)
            for width, height, frames in parsed or [(side, side, 16)]]


def engine_options() -> Any:
    """The engine settings of this worker, from the environment (``I2VFLOW_DEVICE`` ...)."""
    from infra.engine.loader import EngineOptions
    from infra.settings import get_settings

    settings = get_settings()
    return EngineOptions(device=settings.device, dtype=settings.dtype,
                         memory_mode=settings.memory_mode, oom_fallback=settings.oom_fallback,
                         preset=settings.speed_preset, compile_scope=settings.compile_scope, aot=settings.compile_aot,
                         short_attention=settings.short_attention, host_timesteps=settings.host_timesteps,
                         channels_last_group_norm=settings.channels_last_group_norm,
                         channels_last_inputs=settings.channels_last_inputs,
                         coordinate_descent_tuning=settings.coordinate_descent_tuning,
                         fp8_linear=settings.fp8_linear,
                         scheduler=settings.scheduler, max_steps=settings.max_steps,
                         guidance_interval=settings.guidance_interval,
                         feature_cache_interval=settings.feature_cache_interval)


def _retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except ValueError:  # check_inputs and BadInputError: retrying cannot help
        return False
    except Exception:
        return True
    return False


@task(name="render-video", tags=[GPU_TAG], retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=_retry_unless_bad_input, persist_result=True)
def render_video(job: PreparedJob) -> RenderedVideo:
    """1. get the warm engine, 2. render, each decoded chunk to the MP4 encoder, 3. finish and
    verify the MP4, 4. hand back the MP4 and the engine's account."""
    from prefect.runtime import task_run

    from infra.engine.engine import RenderOutOfMemory, get_engine
    from infra.heartbeat import tracking

    engine = get_engine(engine_options())
    spec = job.spec
    with (tracking(str(task_run.id)), structlog.contextvars.bound_contextvars(job_id=job.job_id, input_key=job.stem),
          temporary_mp4(spec.fps) as mp4):
        try:
            result = _render(engine, job, spec, mp4)
        except Exception as exc:
            metrics.observe_render_error(exc)
            if isinstance(exc, RenderOutOfMemory | ValueError):
                raise RenderFailed(f"{type(exc).__name__}: {exc}") from exc
            raise
        metrics.observe_render(result)
        started = time.perf_counter()
        video = in_memory(mp4.close())
    account = {k: v for k, v in vars(result).items() if k != "frames"}
    return RenderedVideo(video=video, engine={**account, "encode_seconds": round(time.perf_counter() - started, 3),
                                              "task_run_id": str(task_run.id)})


def _render(engine: Any, job: PreparedJob, spec: Any, sink: Any) -> Any:
    from infra.engine.engine import RenderRequest

    return engine.render(RenderRequest(
        image=job.rgb_image(), prompt=spec.prompt, negative_prompt=spec.negative_prompt,
        num_frames=spec.num_frames, fps=spec.fps, steps=spec.steps, guidance_scale=spec.guidance_scale,
        width=job.width, height=job.height, seed=job.seed, model=job.model,
    ), sink)


def defer_render(job: PreparedJob, key: str, client: Any = None) -> str:
    """Hand ``job``'s render to the GPU workers under ``key`` through the sync API ``client``
    (one of its own if None); return its task run's id.

    What ``render_video.delay(job)`` does (Prefect 3.9's ``Task.create_run`` for a deferred run,
    outside a flow: parameters to the task-scheduling storage, a Scheduled run the server queues
    for a task worker), except that the dynamic key is ``key`` instead of a random one. Prefect's
    server keeps one flow-less run per (task, dynamic key) and returns the existing run for a
    known key without queueing it again: two watchers handing over one job get one render.

    No serialized context travels with it (``delay`` sends the caller's Prefect settings): the
    render runs under the GPU worker's own settings (its API, its result storage), and rebuilding
    the watcher's settings there held each hand-over's start back 60-80 ms.
    """
    from uuid import uuid4

    from prefect import get_client
    from prefect.results import ResultStore, get_or_create_default_task_scheduling_storage
    from prefect.states import Scheduled
    from prefect.task_worker import store_parameters
    from prefect.utilities.asyncutils import run_coro_as_sync

    state = Scheduled()
    state.state_details.deferred = True
    state.state_details.task_parameters_id = uuid4()

    async def store() -> None:
        storage = await get_or_create_default_task_scheduling_storage()
        result_store = await ResultStore(result_storage=storage).aupdate_for_task(render_video)
        await store_parameters(result_store, state.state_details.task_parameters_id, {"parameters": {"job": job}})

    run_coro_as_sync(store())
    with contextlib.nullcontext(client) if client is not None else get_client(sync_client=True) as api:
        task_run = api.create_task_run(task=render_video, flow_run_id=None, dynamic_key=key,
                                       name=f"render-video-{job.stem.rsplit('/', 1)[-1]}",
                                       extra_tags=[f"model:{job.model}"], state=state, task_inputs={"job": []})
    return str(task_run.id)
