"""Start and stop the processes of one i2vflow host: Prefect server, worker, GPU worker.

Why subprocesses: Prefect's server, its process worker and the GPU task worker are separate
long-lived programs in production too; ``i2vflow up`` (and the test fixtures) start the same
commands an operator would, in their own process groups, and stop all of them on exit.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from infra import forkserver

PROJECT_ROOT = Path(__file__).resolve().parent.parent
Progress = Callable[[str], None]
# What a flow run imports, loaded once by the fork server: Prefect's engine (the module the
# worker's command runs) and the modules of prefect.yaml's entrypoints. Not more: also preloading
# what a run imports later (prefect.flow_engine, task_engine, task_worker, runner, ...: 0.14 s of
# imports) made every forked run wait 2.3 s to submit its render (docs/performance.md).
FLOW_MODULES = ("prefect.engine", "flows.generate", "flows.campaign")


def prefect_env(api_url: str, state_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every i2vflow process: one API, one result store, no telemetry.

    The GPU task worker and the flows exchange task parameters and frames through result
    storage, so they must agree on its location (a shared bucket across hosts).
    """
    env = dict(os.environ)
    env.update({
        "PATH": this_python_first(env.get("PATH")),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOCAL_STORAGE_PATH": str((state_dir / "prefect-results").resolve()),
        "PREFECT_LOGGING_EXTRA_LOGGERS": "i2vflow",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        "PYTHONUNBUFFERED": "1",
        # The process worker's default 10 s poll would dominate drop-to-video time; at 1 s a
        # lone job waits 0.5 s on average for it, one cheap query per second per host.
        "PREFECT_WORKER_QUERY_SECONDS": os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "1"),
        # Flow runs heartbeat at Prefect's floor (prefect.yaml sets it too); a run silent for
        # zombie_after_seconds is marked Crashed by the automation apply_deployments creates.
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30"),
    })
    env.update(extra or {})
    return env


def this_python_first(path: str | None) -> str:
    """PATH with this interpreter's bin first: prefect.yaml starts flow runs with `python3 ...`
    from the worker's PATH, which must be this environment's whether or not it was activated."""
    return os.pathsep.join([str(Path(sys.executable).parent), path or os.defpath])


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


@dataclass
class Supervisor:
    """Owns child processes; ``stop()`` ends them all (SIGTERM, then SIGKILL)."""

    env: dict[str, str]
    log_dir: Path | None  # None: children write to this process's stdout and stderr
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the child
        child = subprocess.Popen(argv, env=env or self.env, cwd=PROJECT_ROOT, stdout=log,
                                 stderr=subprocess.STDOUT if log else None, start_new_session=True)
        self.children[name] = child
        return child

    def stop(self, name: str | None = None, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        names = [name] if name else list(reversed(self.children))
        for key in names:
            child = self.children.pop(key, None)
            if child is None or child.poll() is not None:
                continue
            os.killpg(child.pid, sig)
            try:
                child.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait(5)

    def check(self) -> list[str]:
        """Names of children that died on their own."""
        return [name for name, child in self.children.items() if child.poll() is not None]


def start_prefect_server(sup: Supervisor, port: int, progress: Progress, timeout: float = 120) -> str:
    """A local Prefect server: on SQLite under PREFECT_HOME, or on the database that
    PREFECT_API_DATABASE_CONNECTION_URL in ``sup.env`` names (PostgreSQL)."""
    api_url = f"http://127.0.0.1:{port}/api"
    if api_healthy(api_url):
        progress(f"reusing the Prefect server already answering at {api_url}")
        return api_url
    sup.start("prefect-server", [sys.executable, "-m", "infra.prefectserver",
                                 "--host", "127.0.0.1", "--port", str(port)])
    deadline = time.monotonic() + timeout
    while not api_healthy(api_url):
        if time.monotonic() > deadline or sup.check():
            raise RuntimeError(f"Prefect server did not start; see {sup.log_dir}/prefect-server.log")
        progress("waiting for the Prefect server ...")
        time.sleep(2)
    return api_url


def apply_deployments(env: dict[str, str], work_pool: str, gpu_limit: int, zombie_after_seconds: float = 90.0) -> None:
    """Create the work pool, the ``gpu`` concurrency limit and the zombie-run automation, then
    deploy prefect.yaml."""
    from infra.automations import ensure_zombie_automation  # imports prefect: only when applying

    def prefect(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=PROJECT_ROOT,
                              capture_output=True, text=True, check=check, timeout=180)

    pools = prefect("work-pool", "ls")
    if work_pool not in pools.stdout:
        prefect("work-pool", "create", work_pool, "--type", "process")
    prefect("concurrency-limit", "create", "gpu", str(gpu_limit))
    ensure_zombie_automation(env["PREFECT_API_URL"], zombie_after_seconds)
    result = prefect("--no-prompt", "deploy", "--all", check=False)
    if result.returncode != 0:
        raise RuntimeError(f"prefect deploy failed:\n{result.stdout}\n{result.stderr}")


def visible_gpus() -> list[str]:
    """CUDA device ids this host may use (respecting CUDA_VISIBLE_DEVICES); empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed or [str(i) for i in range(torch.cuda.device_count())]


def gpu_worker_bindings(requested: int, gpus: list[str] | None = None) -> list[str | None]:
    """One entry per GPU worker to start: the CUDA device it is bound to, or None (CPU host).

    ``requested`` 0 means one worker per visible GPU (``gpus``, default: this host's). Two workers
    never share a card: a second render on the same GPU only splits its time and doubles its memory.
    """
    gpus = visible_gpus() if gpus is None else gpus
    if not gpus:
        return [None] * max(1, requested)
    if requested > len(gpus):
        raise ValueError(f"I2VFLOW_GPU_WORKERS={requested} but only {len(gpus)} GPU(s) are visible: {gpus}")
    return list(gpus[: requested or len(gpus)])


def start_workers(sup: Supervisor, work_pool: str, gpus: list[str | None] | None = None,
                  use_forkserver: bool = True) -> None:
    """The flow worker and one warm GPU task worker per GPU."""
    start_flow_worker(sup, work_pool, use_forkserver)
    for index, gpu in enumerate(gpus or [None]):
        start_gpu_worker(sup, index, gpu)


def start_flow_worker(sup: Supervisor, work_pool: str, use_forkserver: bool = True) -> None:
    """A process worker (one process per flow run, woken by the server's events: ``infra/flowworker.py``)
    and, on Linux, the fork server those processes are forked from (``infra/forkserver.py``: the
    command prefect.yaml names asks it, through ``I2VFLOW_FORKSERVER`` in the worker's environment,
    and starts the engine itself without it)."""
    if use_forkserver and forkserver.supported():
        name = f"@i2vflow-forkserver-{secrets.token_hex(6)}"
        sup.env[forkserver.SOCKET_ENV] = name  # restarted workers keep using it
        sup.start("flow-forkserver", [sys.executable, "-m", "infra.forkserver", "serve", name, *FLOW_MODULES])
    sup.start("flow-worker", [sys.executable, "-m", "infra.flowworker", work_pool])


def start_gpu_worker(sup: Supervisor, index: int = 0, gpu: str | None = None) -> subprocess.Popen[bytes]:
    """``i2vflow gpu-worker`` bound to one card (CUDA_VISIBLE_DEVICES), with its own /metrics port."""
    name = "gpu-worker" if index == 0 else f"gpu-worker-{index}"
    env = dict(sup.env)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    base_port = int(env.get("I2VFLOW_GPU_WORKER_METRICS_PORT", "9465"))
    if base_port and index:
        env["I2VFLOW_GPU_WORKER_METRICS_PORT"] = str(base_port + index)
    return sup.start(name, [sys.executable, "-m", "infra.cli", "gpu-worker"], env=env)
