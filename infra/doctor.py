"""``i2vflow doctor``: check every part the pipeline needs and say in plain words what is wrong.

Why a command of its own: when videos stop appearing, the cause is one of a handful of things
(server down, no worker on the pool, deployment never applied, no GPU worker, a wrong inbox,
no model). Each check here looks at the real thing, read-only (the one write is a probe file
in the outbox, removed at once), and a problem comes with the fix. Exit code 1 on a problem.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.settings import Settings

OK, WARN, SKIPPED, PROBLEM = "OK", "WARN", "SKIPPED", "PROBLEM"
RENDER_TASK = "render-video"
RENDER_TASK_KEY = "render_video-"  # Prefect's task key: the function's name, then a hash of its source
WORKER_FRESH_SECONDS = 90.0


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def render(self) -> str:
        line = f"{self.status:<8} {self.name:<22} {self.detail}"
        return line + (f"\n{'':<8} {'':<22} fix: {self.fix}" if self.fix and self.status != OK else "")


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.status != PROBLEM for check in self.checks)

    def render(self) -> str:
        problems = sum(check.status == PROBLEM for check in self.checks)
        summary = "all checks passed" if not problems else f"{problems} problem(s) found"
        return "\n".join([*(check.render() for check in self.checks), "", summary])

    def get(self, name: str) -> Check:
        return next(check for check in self.checks if check.name == name)


def run_checks(settings: Settings, api_url: str | None = None, gpu_metrics_url: str | None = None) -> Report:
    """All checks, in the order data flows. ``api_url`` defaults to PREFECT_API_URL;
    ``gpu_metrics_url`` defaults to this host's GPU worker port ("" skips that check)."""
    from prefect.settings import PREFECT_API_URL

    report = Report()
    api = (api_url if api_url is not None else str(PREFECT_API_URL.value() or "")).rstrip("/")
    server_up = _check_server(report, api)
    if server_up:
        _with_client(report, api, settings)
    else:
        for name in ("work pool", "deployment", "flow command", "gpu concurrency limit", "gpu task worker"):
            report.checks.append(Check(name, SKIPPED, "not checked: the Prefect server does not answer"))
    if gpu_metrics_url is None and settings.gpu_worker_metrics_port:
        gpu_metrics_url = f"http://127.0.0.1:{settings.gpu_worker_metrics_port}/metrics"
    if gpu_metrics_url:
        report.checks.append(_check_gpu_metrics(gpu_metrics_url))
    report.checks.append(_check_store("inbox", settings.inbox, settings, write=False))
    report.checks.append(_check_store("outbox", settings.outbox, settings, write=True))
    report.checks.append(_check_state_dir(settings))
    report.checks.append(_check_model(settings))
    return report


def _check_server(report: Report, api: str) -> bool:
    if not api:
        report.checks.append(Check("prefect server", PROBLEM, "PREFECT_API_URL is not set",
                                   "start everything with `i2vflow up`, or export PREFECT_API_URL="
                                   "http://HOST:4200/api to point at your server"))
        return False
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=5) as response:
            healthy = response.status == 200
        with urllib.request.urlopen(f"{api}/admin/version", timeout=5) as response:
            version = response.read().decode().strip('"')
    except OSError as exc:
        report.checks.append(Check("prefect server", PROBLEM, f"{api} does not answer ({_why(exc)})",
                                   "start it (`i2vflow up` or `prefect server start`), or fix PREFECT_API_URL"))
        return False
    report.checks.append(Check("prefect server", OK if healthy else PROBLEM,
                               f"{api} answers (Prefect {version})" if healthy else f"{api}/health is not OK",
                               "see the Prefect server's log"))
    return healthy


def _with_client(report: Report, api: str, settings: Settings) -> None:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        for check in (_check_pool, _check_deployment, _check_flow_command, _check_gpu_limit, _check_task_worker):
            try:
                report.checks.append(check(client, settings))
            except Exception as exc:  # one failing check must not hide the others
                name = check.__name__.removeprefix("_check_").replace("_", " ")
                report.checks.append(Check(name, PROBLEM, f"could not check: {_why(exc)}",
                                           "see the Prefect server's log"))


def _check_pool(client: Any, settings: Settings) -> Check:
    from prefect.exceptions import ObjectNotFound

    name = settings.work_pool
    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        return Check("work pool", PROBLEM, f"work pool {name!r} does not exist",
                     f"`prefect work-pool create {name} --type process` (`i2vflow up` does this)")
    if pool.is_paused:
        return Check("work pool", PROBLEM, f"work pool {name!r} is paused: no run starts",
                     f"`prefect work-pool resume {name}`")
    workers = client.read_workers_for_work_pool(name)
    now = time.time()
    live = [w for w in workers if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"
            or (w.last_heartbeat_time and now - w.last_heartbeat_time.timestamp() < WORKER_FRESH_SECONDS)]
    if not live:
        return Check("work pool", PROBLEM, f"work pool {name!r} has no live worker: runs stay Scheduled",
                     f"start one: `i2vflow flow-worker` (I2VFLOW_WORK_POOL={name})")
    return Check("work pool", OK, f"{name!r}: {len(live)} live worker(s) ({', '.join(w.name for w in live)[:200]})")


def _check_deployment(client: Any, settings: Settings) -> Check:
    from prefect.exceptions import ObjectNotFound

    try:
        deployment = client.read_deployment_by_name(settings.deployment)
    except ObjectNotFound:
        return Check("deployment", PROBLEM, f"deployment {settings.deployment!r} does not exist",
                     "apply prefect.yaml: `prefect --no-prompt deploy --all` (`i2vflow up` does this), "
                     "or fix I2VFLOW_DEPLOYMENT")
    if deployment.paused:
        return Check("deployment", PROBLEM, f"deployment {settings.deployment!r} is paused",
                     f"`prefect deployment resume {settings.deployment}`")
    if deployment.work_pool_name != settings.work_pool:
        return Check("deployment", PROBLEM, f"{settings.deployment!r} uses work pool "
                     f"{deployment.work_pool_name!r}, not {settings.work_pool!r}",
                     "fix the pool in prefect.yaml or I2VFLOW_WORK_POOL, then deploy again")
    return Check("deployment", OK, f"{settings.deployment!r} on pool {deployment.work_pool_name!r}")


def _check_flow_command(client: Any, settings: Settings) -> Check:
    """The deployment's engine command (prefect.yaml) looked up on this PATH, as a worker started
    from this shell would: another interpreter than i2vflow's would crash every flow run on import."""
    from prefect.exceptions import ObjectNotFound

    try:
        deployment = client.read_deployment_by_name(settings.deployment)
    except ObjectNotFound:
        return Check("flow command", SKIPPED, "not checked: no deployment")
    command = (deployment.job_variables or {}).get("command")
    if not command:
        return Check("flow command", OK, "flow runs start with the worker's own interpreter")
    program = shlex.split(command)[0]
    fix = (f"put {Path(sys.executable).parent} first on the worker's PATH "
           "(activate the environment; `i2vflow up` does it)")
    found = shutil.which(program)
    if found is None:
        return Check("flow command", PROBLEM, f"{program!r} of {command!r} is not on PATH: no flow run can start", fix)
    probe = subprocess.run([found, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True, timeout=60)
    prefix = probe.stdout.strip()
    if probe.returncode != 0 or Path(prefix).resolve() != Path(sys.prefix).resolve():
        return Check("flow command", PROBLEM, f"{program!r} on PATH is {found} (environment {prefix or '?'}), not "
                     f"i2vflow's ({sys.prefix}): flow runs would crash on import", fix)
    return Check("flow command", OK, f"{command!r} runs {found}")


def _check_gpu_limit(client: Any, settings: Settings) -> Check:
    from prefect.exceptions import ObjectNotFound

    try:
        limit = client.read_concurrency_limit_by_tag("gpu")
    except ObjectNotFound:
        return Check("gpu concurrency limit", PROBLEM, "no concurrency limit on tag 'gpu': renders may pile "
                     "onto one GPU", f"`prefect concurrency-limit create gpu {settings.gpu_limit}`")
    held = len(limit.active_slots or [])
    if limit.concurrency_limit < 1:
        return Check("gpu concurrency limit", PROBLEM, f"limit on tag 'gpu' is {limit.concurrency_limit}: "
                     "no render can start", f"`prefect concurrency-limit create gpu {settings.gpu_limit}`")
    wanted = len(_render_workers(client)) * settings.gpu_worker_slots
    if limit.concurrency_limit < wanted:
        return Check("gpu concurrency limit", WARN, f"tag 'gpu' has {limit.concurrency_limit} slot(s) for "
                     f"{wanted // settings.gpu_worker_slots} GPU worker(s) x {settings.gpu_worker_slots} "
                     "(I2VFLOW_GPU_WORKER_SLOTS): staged renders wait for a slot and the GPUs idle between renders",
                     f"`prefect concurrency-limit create gpu {wanted}`")
    return Check("gpu concurrency limit", OK, f"tag 'gpu': {held} of {limit.concurrency_limit} slot(s) in use")


def _render_workers(client: Any) -> list[dict[str, Any]]:
    """Prefect's own record of task workers subscribed to the render task over a websocket (any host)."""
    response = client.request("POST", "/task_workers/filter", json={})
    return [w for w in response.json() if any(key.startswith(RENDER_TASK_KEY) for key in w.get("task_keys", []))]


def _check_task_worker(client: Any, settings: Settings) -> Check:
    workers = _render_workers(client)
    if not workers:
        return Check("gpu task worker", PROBLEM, f"no task worker serves {RENDER_TASK!r}: renders wait forever",
                     "start one per GPU: `i2vflow gpu-worker` (with the same PREFECT_API_URL and result storage)")
    return Check("gpu task worker", OK, f"{len(workers)} worker(s) serve {RENDER_TASK!r}")


def _check_gpu_metrics(url: str) -> Check:
    """The GPU worker's own /metrics on this host: alive, and how much memory it holds."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError as exc:
        return Check("gpu worker metrics", WARN, f"{url} does not answer ({_why(exc)})",
                     "on this host: is `i2vflow gpu-worker` running, with I2VFLOW_GPU_WORKER_METRICS_PORT "
                     "matching? (workers on other hosts are checked above)")
    values = _samples(text)
    loads = values.get("i2vflow_model_loads_total")
    if loads is None:
        return Check("gpu worker metrics", WARN, f"{url} answers but is not an i2vflow GPU worker",
                     "check I2VFLOW_GPU_WORKER_METRICS_PORT")
    renders = values.get("i2vflow_render_seconds_count", 0)
    used = values.get('i2vflow_gpu_memory_bytes{kind="device_used"}')
    total = values.get('i2vflow_gpu_memory_bytes{kind="total"}')
    rss = values.get('i2vflow_process_memory_bytes{kind="rss"}', 0.0)
    memory = (f"GPU memory {used / 2**30:.1f} of {total / 2**30:.1f} GiB" if used is not None and total
              else f"RSS {rss / 2**20:.0f} MiB (no CUDA in use)")
    if loads < 1:
        return Check("gpu worker metrics", WARN, f"alive but no model loaded yet; {memory}",
                     "it loads at start-up (or at the first job); see its log if this lasts")
    return Check("gpu worker metrics", OK, f"alive: {loads:.0f} model load(s), {renders:.0f} render(s), {memory}")


def _samples(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                continue
    return values


def _check_store(name: str, location: str, settings: Settings, write: bool) -> Check:
    """A folder must exist (the doctor does not create it: a missing one is often a typo);
    a bucket must exist and list; the outbox must take a write (a probe file, removed)."""
    from infra.store import StoreError, open_store

    env = f"I2VFLOW_{name.upper()}"
    if not location.startswith("s3://"):
        folder = Path(location.removeprefix("file://")).expanduser().absolute()
        if not folder.exists():
            return Check(name, PROBLEM, f"folder {folder} does not exist",
                         f"create it (`mkdir -p {folder}`) or fix {env}")
        if not folder.is_dir():
            return Check(name, PROBLEM, f"{folder} is not a folder", f"point {env} at a folder")
        if not os.access(folder, os.R_OK | os.X_OK | (os.W_OK if write else 0)):
            return Check(name, PROBLEM, f"folder {folder} is not {'writable' if write else 'readable'} by "
                         f"user {os.getuid()}", f"fix its permissions or point {env} elsewhere")
    try:
        store = open_store(location, settings)
        next(iter(store.list()), None)
        if write:
            probe = f".i2vflow-doctor-{uuid.uuid4().hex[:8]}.tmp"
            store.write(probe, b"doctor probe\n", "text/plain")
            store.delete(probe)
    except (StoreError, OSError) as exc:
        return Check(name, PROBLEM, f"{location}: {_why(exc)}",
                     f"fix {env} or the store's credentials/endpoint (I2VFLOW_S3_*)")
    return Check(name, OK, f"{store.describe()} {'writable' if write else 'readable'}")


def _check_state_dir(settings: Settings) -> Check:
    state = settings.state_dir
    if state.exists() and not os.access(state, os.W_OK | os.X_OK):
        return Check("state dir", PROBLEM, f"{state} is not writable (ledger and logs live here)",
                     "fix its permissions or I2VFLOW_STATE_DIR")
    if not settings.ledger_path.exists():
        return Check("state dir", OK, f"{state} (no ledger yet: no job seen on this host)")
    from infra.ledger import Ledger

    ledger = Ledger(settings.ledger_path)
    try:
        counts = ledger.counts()
    finally:
        ledger.close()
    waiting = counts.get("detected", 0) + counts.get("submitting", 0)
    failed = counts.get("failed", 0)
    said = f"ledger: {sum(counts.values())} job(s), {waiting} waiting for a run, {failed} failed"
    if failed:  # some may be the service's (service_failed), which the operator can render again
        said += " (`i2vflow retry --all` renders again those the service gave up on, once it is fixed)"
    return Check("state dir", OK, said)


def _check_model(settings: Settings) -> Check:
    """The configured model resolves, and its weights are where the GPU worker will look."""
    from infra.engine.registry import REGISTRY, resolve_model

    name, cache = settings.model, settings.model_cache.expanduser()
    entry = REGISTRY.get(name)
    if entry is not None and not _is_hub_id(entry.source):  # built locally into the cache (tiny)
        folder = cache / entry.source
        if (folder / "model_index.json").is_file():
            return Check("model cache", OK, f"{name!r} built at {folder}" +
                         (" (random weights: videos are noise)" if entry.is_noise else ""))
        writable = _writable(cache)
        return Check("model cache", OK if writable else PROBLEM,
                     f"{name!r} not built yet in {cache}; the GPU worker builds it at start-up",
                     f"make {cache} writable or run `i2vflow build-tiny`")
    if entry is None and Path(name).expanduser().is_dir():
        try:
            resolve_model(name, cache)
        except ValueError as exc:
            return Check("model cache", PROBLEM, str(exc), "point I2VFLOW_MODEL at a save_pretrained folder")
        return Check("model cache", OK, f"local folder {name}")
    source = entry.source if entry is not None else name
    if not _is_hub_id(source):
        return Check("model cache", PROBLEM, f"model {name!r} is not a registry name ({', '.join(REGISTRY)}), "
                     "an existing folder or a hub id 'owner/name'", "fix I2VFLOW_MODEL")
    return _check_hub_cache(name, source)


def _check_hub_cache(name: str, source: str) -> Check:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - diffusers depends on it
        return Check("model cache", WARN, f"{name!r} ({source}): cannot inspect the hub cache")
    cached = try_to_load_from_cache(source, "model_index.json")
    if isinstance(cached, str):
        return Check("model cache", OK, f"{name!r} ({source}) in the Hugging Face cache")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return Check("model cache", PROBLEM, f"{name!r} ({source}) is not in the Hugging Face cache and "
                     "HF_HUB_OFFLINE is set", f"download it once: `hf download {source}`, or unset HF_HUB_OFFLINE")
    return Check("model cache", WARN, f"{name!r} ({source}) not in this host's Hugging Face cache: the GPU "
                 "worker downloads it at start-up (many GB)", f"pre-fetch with `hf download {source}`")


def _is_hub_id(source: str) -> bool:
    from infra.engine.registry import HUB_ID_PATTERN

    return bool(HUB_ID_PATTERN.match(source)) and not Path(source).expanduser().exists()


def _writable(folder: Path) -> bool:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return os.access(probe, os.W_OK | os.X_OK)


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    text = str(reason if reason is not None else exc) or type(exc).__name__
    return text[:300]


def main(settings: Settings, say: Callable[[str], None], api_url: str | None = None,
         gpu_metrics_url: str | None = None) -> int:
    report = run_checks(settings, api_url, gpu_metrics_url)
    say(report.render())
    return 0 if report.ok else 1
