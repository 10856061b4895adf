"""The ``i2vflow`` command: run the service, or one of its parts.

Why at the edge: this is the one module that may import flows and tasks (to serve them); the
rest of ``infra`` never does.

    i2vflow up          # everything on one host: Prefect server, deployments, workers, watcher
    i2vflow watch       # the watcher alone (point PREFECT_API_URL at your server)
    i2vflow gpu-worker  # the warm GPU task worker alone
    i2vflow flow-worker # the process worker alone, its flow runs forked from a fork server
    i2vflow build-tiny  # build the offline random-weight model into the model cache
    i2vflow compile     # compile the engine for the warm-up shapes into the compile cache
    i2vflow campaign plan|run SPEC  # a re-generation campaign: print its plan, or run it now
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="i2vflow: images in, videos out.")


def _say(message: str) -> None:
    typer.echo(f"[i2vflow] {message}", err=True)


@app.command()
def up(port: int = typer.Option(4200, help="Port of the local Prefect server.")) -> None:
    """Start everything on embedded defaults and watch the inbox until Ctrl-C."""
    from infra import service
    from infra.settings import get_settings

    settings = get_settings()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    prefect_home = os.environ.setdefault("PREFECT_HOME", str((settings.state_dir / "prefect").resolve()))
    sup = service.Supervisor(env={}, log_dir=settings.state_dir / "logs")
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        api_url = os.environ.get("PREFECT_API_URL") or ""
        if not api_url:
            database = ("the database PREFECT_API_DATABASE_CONNECTION_URL names"  # not printed: it may hold a password
                        if os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL") else f"SQLite under {prefect_home}")
            _say(f"starting a local Prefect server ({database}) ...")
            sup.env = service.prefect_env("", settings.state_dir)
            sup.env.pop("PREFECT_API_URL")
            api_url = service.start_prefect_server(sup, port, _say)
        sup.env = service.prefect_env(api_url, settings.state_dir)
        os.environ.update({k: sup.env[k] for k in ("PREFECT_API_URL", "PREFECT_LOCAL_STORAGE_PATH",
                                                     "PREFECT_LOGGING_EXTRA_LOGGERS",
                                                     "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW")})
        gpus = service.gpu_worker_bindings(settings.gpu_workers)
        _say("creating the work pool, the gpu concurrency limit and the deployments ...")
        slots = len(gpus) * settings.gpu_worker_slots
        service.apply_deployments(sup.env, settings.work_pool, max(settings.gpu_limit, slots),
                                  settings.zombie_after_seconds)
        bound = ", ".join(f"GPU {gpu}" for gpu in gpus if gpu is not None) or "CPU"
        _say(f"starting the flow worker and {len(gpus)} GPU worker(s) ({bound}) ...")
        service.start_workers(sup, settings.work_pool, gpus, settings.flow_forkserver)
        _say(f"Prefect UI: {api_url.removesuffix('/api')}")
        _say(f"drop an image and a JSON into {_where(settings.inbox)}; videos appear in {_where(settings.outbox)}")
        _say("Ctrl-C stops everything")
        _watch(stop, supervisor=sup)
    except KeyboardInterrupt:
        pass
    finally:
        _say("stopping ...")
        sup.stop()


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM stops cleanly; Ctrl-C raises KeyboardInterrupt even where the shell started us
    with SIGINT ignored (a background job of a script), so children are never orphaned."""
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _where(location: str) -> str:
    return location if location.startswith("s3://") else str(Path(location).resolve())


@app.command()
def watch() -> None:
    """Run the watcher: list the inbox, create one flow run per job, until Ctrl-C."""
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        _watch(stop)
    except KeyboardInterrupt:
        stop.set()


def _watch(stop: threading.Event, supervisor: object | None = None) -> None:
    import structlog

    from flows.generate import hand_over_render
    from infra.watch.run import build_watcher

    watcher, closer = build_watcher(hand_over=hand_over_render)
    thread = threading.Thread(target=watcher.run, args=(stop,), name="watcher", daemon=True)
    thread.start()
    poller = _watcher_metrics(watcher)
    log = structlog.get_logger("i2vflow.cli")
    try:
        while not stop.wait(1.0):
            dead = supervisor.check() if supervisor is not None else []  # type: ignore[attr-defined]
            if dead:
                log.error("service.child_died", children=dead)
                _say(f"{', '.join(dead)} stopped unexpectedly; see data/state/logs/. Stopping.")
                stop.set()
    finally:
        stop.set()
        if poller is not None:
            poller.stop()
        thread.join(timeout=15)
        closer()


def _watcher_metrics(watcher: object) -> object | None:
    """Serve the watcher's /metrics and poll run outcomes from Prefect (docs/operations.md)."""
    from infra import metrics

    settings = watcher.settings  # type: ignore[attr-defined]
    if not metrics.start_metrics_server(settings.metrics_port, settings.metrics_host):
        return None
    return metrics.OutcomePoller(watcher.inbox_location, settings.deployment,  # type: ignore[attr-defined]
                                 watcher.ledger,  # type: ignore[attr-defined]
                                 interval=settings.metrics_poll_seconds).start()


@app.command("flow-worker")
def flow_worker() -> None:
    """Run the process worker of I2VFLOW_WORK_POOL, with the fork server its flow runs start
    from (what `up` starts; on a fleet host, instead of `prefect worker start`), until Ctrl-C."""
    from infra import service
    from infra.settings import get_settings

    settings = get_settings()
    env = {**os.environ, "PATH": service.this_python_first(os.environ.get("PATH"))}
    sup = service.Supervisor(env=env, log_dir=None)  # their output is ours
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        service.start_flow_worker(sup, settings.work_pool, settings.flow_forkserver)
        while not stop.wait(1.0):
            if dead := sup.check():
                _say(f"{', '.join(dead)} stopped unexpectedly. Stopping.")
                raise typer.Exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        sup.stop()


@app.command("gpu-worker")
def gpu_worker(warm: bool = typer.Option(True, help="Load the model before taking jobs.")) -> None:
    """Serve the render task in this process, keeping the model loaded across jobs."""
    import asyncio

    from prefect.task_worker import aserve

    from infra.heartbeat import HeartbeatPublisher
    from infra.logging import configure_logging
    from infra.results import start_result_pruner
    from infra.settings import get_settings
    from tasks.render import render_video

    settings = get_settings()
    configure_logging(settings.resolved_log_file)
    _gpu_worker_metrics(settings)
    if warm:
        _warm_engine(settings)
    heartbeat = HeartbeatPublisher()
    heartbeat.start()
    pruner = start_result_pruner(settings.result_ttl_seconds)
    try:
        # On this thread's own event loop: ``serve`` would run it on Prefect's global loop thread,
        # which a render's first concurrency-slot acquisition waits on while holding the lock
        # that the worker's next event emission takes (a deadlock seen in CI at start-up with a
        # backlog of renders).
        with _one_prefect_client():
            asyncio.run(aserve(render_video, limit=settings.gpu_worker_slots))
    finally:
        heartbeat.stop()
        if pruner is not None:
            pruner.stop()


def _warm_engine(settings: Any) -> list[tuple[str, float]]:
    """Load the model and render a 2-step warm-up at each of ``I2VFLOW_WARMUP_SHAPES``, so
    compilation happens here, not in a job. Returns each shape ("WxHxF") and its seconds."""
    from infra.engine.engine import get_engine
    from tasks.render import engine_options, warmup_requests

    engine = get_engine(engine_options())
    warmed = []
    for warmup in warmup_requests(settings.model, settings.warmup_shapes):
        started = time.perf_counter()
        engine.warm(settings.model, warmup=warmup)
        warmed.append((f"{warmup.width}x{warmup.height}x{warmup.num_frames}", time.perf_counter() - started))
    return warmed


@app.command("compile")
def compile_engine() -> None:
    """Compile the engine for I2VFLOW_WARMUP_SHAPES into the compile cache, then exit.

    Why: a machine's first GPU worker compiles each shape for minutes (about 4 on an H100, 10 with
    I2VFLOW_COORDINATE_DESCENT_TUNING); run this once per kind of GPU on the cache that workers
    will use (a shared volume, a fleet image built on a GPU host) and they start in seconds.
    Needs no Prefect server. Exit code 1 when the speed plan compiles nothing or a shape could
    not be packaged.
    """
    os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")  # no server, no flow run to log to
    from infra.engine.engine import get_engine
    from infra.engine.speed import aot_fallbacks
    from infra.logging import configure_logging
    from infra.settings import get_settings
    from tasks.render import engine_options

    settings = get_settings()
    configure_logging(settings.resolved_log_file)
    loaded = get_engine(engine_options()).warm(settings.model)
    plan = loaded.speed
    if plan.compile == "off":
        skipped = f" (skipped: {'; '.join(plan.skipped)})" if plan.skipped else ""
        _say(f"nothing to compile: speed preset {plan.preset!r} compiles nothing on {loaded.device}{skipped}. "
             "On a CUDA host set I2VFLOW_SPEED_PRESET=fast (or leave it auto).")
        raise typer.Exit(1)
    packages = Path(plan.compile_cache_dir) / "aot"
    before = {p.name for p in packages.glob("*.pt2")}
    for shape, seconds in _warm_engine(settings):
        _say(f"{shape}: ready in {seconds:.1f} s")
    if not plan.aot:
        _say(f"{plan.compile_cache_dir}: inductor's caches are warm, but without AOT packages "
             f"(aot off or compile_scope={plan.compile_scope}) every start still traces the model")
        return
    after = {p.name for p in packages.glob("*.pt2")}
    _say(f"{packages}: built {' '.join(sorted(after - before)) or 'nothing'}; "
         f"already there {' '.join(sorted(after & before)) or 'nothing'}")
    failures = aot_fallbacks(loaded.pipeline)
    if failures:
        _say("not packaged (these compile again in every new process): " + "; ".join(failures))
        raise typer.Exit(1)


def _one_prefect_client() -> contextlib.ExitStack:
    """One Prefect API client for every render this worker runs, as a flow run shares one with
    its task threads. Without it each render's start built its own (an SSL context and a
    connection: 40-50 ms of every render's start). If the API does not answer yet, each render
    makes its own, as Prefect does by default."""
    from prefect.context import SyncClientContext

    stack = contextlib.ExitStack()
    try:
        stack.enter_context(SyncClientContext.get_or_create())
    except Exception as exc:
        _say(f"no shared Prefect client ({exc!r}); each render will open its own")
    return stack


def _gpu_worker_metrics(settings: object) -> None:
    """Serve the GPU worker's /metrics: render latency, model loads, OOM fallbacks, memory."""
    from infra import metrics
    from infra.engine.engine import model_loads_in_process

    metrics.register_gpu_worker_metrics(model_loads_in_process, settings.device)  # type: ignore[attr-defined]
    metrics.start_metrics_server(settings.gpu_worker_metrics_port, settings.metrics_host)  # type: ignore[attr-defined]


@app.command()
def doctor(
    api_url: str = typer.Option(None, help="Prefect API to check (default: PREFECT_API_URL)."),
    gpu_metrics: str = typer.Option(None, help="A GPU worker's /metrics URL (default: this host's "
                                    "I2VFLOW_GPU_WORKER_METRICS_PORT; '' skips it)."),
) -> None:
    """Check the Prefect server, work pool and workers, deployment, GPU worker, stores and model;
    print what is wrong in plain words. Exit code 1 when something is."""
    from infra.doctor import main
    from infra.settings import get_settings

    raise typer.Exit(main(get_settings(), typer.echo, api_url, gpu_metrics))


@app.command()
def retry(
    stems: Annotated[list[str] | None, typer.Argument(help="Inputs to retry, by stem (the file name without "
                                                       "extension, with its folders: shoes/red).")] = None,
    every: bool = typer.Option(False, "--all", help="Every job the service gave up on."),
) -> None:
    """Render again jobs the service gave up on (their error file says service_failed), once the
    cause is fixed: each job's own flow run goes back in the queue. Jobs that failed because of
    their input are refused. Run it where the watcher runs (it reads the watcher's ledger)."""
    from infra.ledger import Ledger
    from infra.orchestrator import read_run_states, reschedule_run
    from infra.settings import get_settings
    from infra.watch.retry import retry_failed

    if bool(stems) == every:
        typer.echo("name the inputs to retry (their stems) or pass --all", err=True)
        raise typer.Exit(2)
    ledger = Ledger(get_settings().ledger_path)
    try:
        outcomes = retry_failed(ledger, None if every else stems, read_run_states, reschedule_run)
    finally:
        ledger.close()
    for outcome in outcomes:
        typer.echo(f"{outcome.action:<11} {outcome.stem}: {outcome.detail}")
    if not outcomes:
        typer.echo("no job has failed: nothing to retry")
    if any(outcome.action == "refused" for outcome in outcomes):
        raise typer.Exit(1)


@app.command("build-tiny")
def build_tiny(target: Path | None = None) -> None:
    """Build the random-weight tiny I2VGen-XL offline (its videos are noise) into TARGET
    (default: the model cache)."""
    from infra.engine.tiny import build_tiny_i2vgenxl
    from infra.settings import get_settings

    path = build_tiny_i2vgenxl(target or get_settings().model_cache / "tiny-i2vgen-xl")
    typer.echo(str(path))


campaign_app = typer.Typer(no_args_is_help=True,
                           help="Scheduled re-generation campaigns (docs/campaigns.md).")
app.add_typer(campaign_app, name="campaign")


def _campaign_spec(spec: str) -> object:
    from infra.campaign import CampaignSpecError, read_campaign_spec
    from infra.settings import get_settings
    from infra.store import open_store

    try:
        return read_campaign_spec(spec, lambda location: open_store(location, get_settings()))
    except CampaignSpecError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"{spec}: cannot read: {exc}", err=True)
        raise typer.Exit(2) from None


@campaign_app.command("plan")
def campaign_plan(
    spec: str = typer.Argument(..., help="Campaign file (YAML/JSON), or s3://bucket/key."),
    run_date: str = typer.Option(None, "--date", help="Slot date (default: today in the campaign's zone)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Validate the spec and print the plan (items, what is done, GPU estimate); renders nothing."""
    import json

    from infra.campaign import plan_campaign, store_modified_at, survey
    from infra.settings import get_settings
    from infra.store import open_store

    campaign = _campaign_spec(spec)
    settings = get_settings()
    slot = run_date or campaign.run_date()  # type: ignore[attr-defined]
    inbox, outbox = open_store(settings.inbox, settings), open_store(settings.outbox, settings)
    found = survey(campaign, inbox, outbox, slot, store_modified_at(inbox))  # type: ignore[arg-type]
    plan = plan_campaign(campaign, found, slot, default_model=settings.model)  # type: ignore[arg-type]
    typer.echo(json.dumps(plan.as_json(), indent=2) if as_json else plan.describe())


@campaign_app.command("run")
def campaign_run(
    spec: str = typer.Argument(..., help="Campaign file (YAML/JSON, a path the workers can read), or s3://..."),
    run_date: str = typer.Option(None, "--date", help="Slot date (default: today in the campaign's zone)."),
    wait: bool = typer.Option(False, help="Wait for the run to finish and print its result."),
) -> None:
    """Run a campaign now through the `campaign` deployment (the spec is checked here first)."""
    from prefect.deployments import run_deployment

    campaign = _campaign_spec(spec)
    path = spec if spec.startswith("s3://") else str(Path(spec).resolve())
    parameters = {"spec_path": path, **({"run_date": run_date} if run_date else {})}
    run = run_deployment(name="campaign/campaign", parameters=parameters, timeout=None if wait else 0,
                         flow_run_name=f"{campaign.name}-{run_date or 'now'}",  # type: ignore[attr-defined]
                         tags=[f"campaign:{campaign.name}"])  # type: ignore[attr-defined]
    state = run.state
    said = f"{state.name}: {state.message or ''}" if state else "scheduled"
    typer.echo(f"flow run {run.id} {said}")
    if wait and state is not None and not state.is_completed():
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
