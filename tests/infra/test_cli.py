"""The `i2vflow` command: `flow-worker` starts and stops the process worker and its fork server
together; `compile` builds the engine's packages for the warm-up shapes and exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from infra.service import PROJECT_ROOT
from tests.helpers import wait_for


def test_flow_worker_serves_the_pool_from_a_fork_server_and_stops_with_both(prefect_api: str,
                                                                              tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    pool = f"cli-flow-worker-{os.getpid()}"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "I2VFLOW_WORK_POOL": pool,
           "PREFECT_WORKER_QUERY_SECONDS": "1"}
    command = subprocess.Popen([sys.executable, "-m", "infra.cli", "flow-worker"], cwd=PROJECT_ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def workers() -> list[object]:
            with get_client(sync_client=True) as client:
                try:
                    return client.read_workers_for_work_pool(pool)
                except (ObjectNotFound, PrefectHTTPStatusError):  # the worker creates the pool when it starts
                    return []

        wait_for(workers, timeout=60, what=f"a worker polling pool {pool}")
        children = {" ".join(c.cmdline()[1:3]): c for c in psutil.Process(command.pid).children()}
        assert set(children) == {"-m infra.forkserver", "-m infra.flowworker"}
        assert children["-m infra.flowworker"].cmdline()[3:] == [pool]
        server_name = children["-m infra.forkserver"].cmdline()[4]
        # The worker's environment names the server, so the command prefect.yaml gives its runs asks it.
        assert children["-m infra.flowworker"].environ()["I2VFLOW_FORKSERVER"] == server_name
    finally:
        command.send_signal(signal.SIGTERM)
        out, _ = command.communicate(timeout=60)
    assert command.returncode == 0, out
    assert "i2vflow forkserver: 3 module(s) imported" in out  # the children write to its output
    wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children.values()),
             timeout=20, what="both children stopped")


def run_compile(tmp_path: Path, models: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "I2VFLOW_DEVICE": "cpu", "I2VFLOW_MODEL_CACHE": str(models),
           "I2VFLOW_COMPILE_CACHE": str(tmp_path / "compile-cache"), "I2VFLOW_LOG_FILE": str(tmp_path / "log.jsonl"),
           **{f"I2VFLOW_{name.upper()}": value for name, value in settings.items()}}
    return subprocess.run([sys.executable, "-m", "infra.cli", "compile"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)


def test_compile_packages_the_warmup_shapes_once_and_exits(tmp_path: Path, tiny_model_cache: Path) -> None:
    # What a fleet runs once per kind of GPU on the workers' cache; here on the CPU, the tiny model.
    first = run_compile(tmp_path, tiny_model_cache, speed_preset="fast", warmup_shapes="64x64x8")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    packages = sorted((tmp_path / "compile-cache" / "aot").glob("*.pt2"))
    assert [p.name.split("-")[0] for p in packages] == ["unet", "vae"]  # the UNet and the VAE decoder
    assert "[i2vflow] 64x64x8: ready in" in first.stderr
    assert f"built {' '.join(p.name for p in packages)}; already there nothing" in first.stderr
    built_at = [p.stat().st_mtime_ns for p in packages]

    again = run_compile(tmp_path, tiny_model_cache, speed_preset="fast", warmup_shapes="64x64x8")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"built nothing; already there {' '.join(p.name for p in packages)}" in again.stderr
    assert [p.stat().st_mtime_ns for p in packages] == built_at


def test_compile_refuses_a_speed_plan_that_compiles_nothing(tmp_path: Path, tiny_model_cache: Path) -> None:
    result = run_compile(tmp_path, tiny_model_cache, speed_preset="stock")
    assert result.returncode == 1
    assert ("nothing to compile: speed preset 'stock' compiles nothing on cpu. "
            "On a CUDA host set I2VFLOW_SPEED_PRESET=fast") in result.stderr
    assert not (tmp_path / "compile-cache" / "aot").exists()
