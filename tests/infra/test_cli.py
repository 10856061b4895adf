"""`i2vflow flow-worker`: the process worker and its fork server, started and stopped together."""

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

