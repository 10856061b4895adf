"""Session fixtures: a real Prefect server, real workers, the tiny model, a real S3 server.

Why session scope: a Prefect server takes ~20 s to start on 2 cores and the GPU worker holds
the model warm across jobs, exactly as in production; each test gets its own inbox, outbox
and ledger, so tests stay independent while sharing the expensive parts.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

if TYPE_CHECKING:
    from tests.s3server import S3Server

pytest_plugins = ["tests.s3server"]


@pytest.fixture(scope="session")
def tiny_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache holding the offline tiny I2VGen-XL, built once per session."""
    from infra.engine.tiny import build_tiny_i2vgenxl

    cache = tmp_path_factory.mktemp("model-cache")
    build_tiny_i2vgenxl(cache / "tiny-i2vgen-xl")
    return cache


@pytest.fixture(scope="session")
def prefect_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prefect's result storage, shared by this process (its watchers hand renders over) and the
    service's processes, as `i2vflow up` shares it."""
    return tmp_path_factory.mktemp("prefect-results")


@pytest.fixture(scope="session")
def prefect_api(prefect_results: Path) -> Iterator[str]:
    """A real Prefect server (SQLite in a temp dir) for the whole session."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # Entered first: the harness makes the settings it starts with global, so watcher threads see them.
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: prefect_results}), \
            prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


@dataclass
class Service:
    """The running worker side of i2vflow: the deployment, a flow worker, the GPU worker."""

    supervisor: object
    env: dict[str, str]
    state_dir: Path
    _flow_worker_argv: list[str] = field(default_factory=list)

    def restart_gpu_worker(self) -> None:
        from infra.service import start_gpu_worker

        self.supervisor.stop("gpu-worker")  # type: ignore[attr-defined]
        start_gpu_worker(self.supervisor)  # type: ignore[arg-type]

    def crash_flow_worker(self) -> list[int]:
        """SIGKILL the process worker and every process under it, as a host crash would; returns
        the pids of the processes it had started.

        Prefect 3.9 starts each flow run in a session of its own, so a signal to the worker's
        process group alone would leave the runs alive. Everything is frozen (SIGSTOP) first, so
        no process sees another die and reports it, and nothing new is spawned unseen.
        """
        import psutil

        worker = self.supervisor.children.pop("flow-worker")  # type: ignore[attr-defined]
        self._flow_worker_argv = list(worker.args)
        root = psutil.Process(worker.pid)
        frozen = [root]
        root.suspend()
        while fresh := [p for p in root.children(recursive=True) if p not in frozen]:
            for process in fresh:
                process.suspend()
            frozen += fresh
        for process in frozen:
            process.kill()
        worker.wait(10)
        return [p.pid for p in frozen[1:]]

    def start_flow_worker(self) -> None:
        self.supervisor.start("flow-worker", self._flow_worker_argv)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def service(prefect_api: str, prefect_results: Path, tiny_model_cache: Path,
            tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[Service]:
    """Deploy prefect.yaml and start the same workers `i2vflow up` starts (they reach the
    session's S3 server too, so tickets with s3:// inboxes and outboxes work)."""
    from infra.service import Supervisor, apply_deployments, prefect_env, start_workers
    from tests.ports import free_port

    state = tmp_path_factory.mktemp("service-state")
    env = prefect_env(prefect_api, state, extra={
        "I2VFLOW_MODEL_CACHE": str(tiny_model_cache),
        "I2VFLOW_STATE_DIR": str(state),
        "I2VFLOW_MODEL": "tiny",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "I2VFLOW_S3_ENDPOINT": s3_server.endpoint,
        "I2VFLOW_S3_REGION": s3_server.region,
        "I2VFLOW_S3_ACCESS_KEY": s3_server.access_key,
        "I2VFLOW_S3_SECRET_KEY": s3_server.secret_key,
        "I2VFLOW_GPU_WORKER_METRICS_PORT": str(free_port()),  # scraped in tests
        "PREFECT_LOCAL_STORAGE_PATH": str(prefect_results),
    })
    supervisor = Supervisor(env=env, log_dir=state / "logs")
    # A flow run silent 45 s is crashed by Prefect (heartbeats every 30 s; 90 s default).
    # Render slots as `i2vflow up` sets them: one GPU worker x I2VFLOW_GPU_WORKER_SLOTS (2).
    apply_deployments(env, "i2vflow", gpu_limit=2, zombie_after_seconds=45)
    start_workers(supervisor, "i2vflow")
    yield Service(supervisor, env, state)
    supervisor.stop()


@dataclass
class RunningWatcher:
    watcher: object
    stop_event: threading.Event
    thread: threading.Thread
    close: object

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=20)
        self.close()  # type: ignore[operator]


@pytest.fixture
def start_watcher(service: Service, tmp_path: Path) -> Iterator[object]:
    """Start watchers in threads of this process; all are stopped after the test."""
    from flows.generate import hand_over_render
    from infra.settings import Settings
    from infra.watch.run import build_watcher

    running: list[RunningWatcher] = []

    def start(inbox: Path, outbox: Path, state_dir: Path | None = None, hand_over: object = hand_over_render,
              **overrides: object) -> RunningWatcher:
        settings = Settings(inbox=str(inbox), outbox=str(outbox), state_dir=state_dir or tmp_path / "state",
                            rescan_seconds=1.0, settle_seconds=0.3, **overrides)
        watcher, close = build_watcher(settings, hand_over=hand_over)  # type: ignore[arg-type]
        stop = threading.Event()
        thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
        thread.start()
        handle = RunningWatcher(watcher, stop, thread, close)
        running.append(handle)
        return handle

    yield start
    for handle in running:
        if not handle.stop_event.is_set():
            handle.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e runs the whole service: `-m "not e2e"` gives a quicker loop."""
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.e2e)
