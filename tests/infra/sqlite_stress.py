"""Concurrent state changes against a Prefect server, its client's retries off: how many failed.

Run as ``python -m tests.infra.sqlite_stress`` with PREFECT_API_URL set; prints
``{"calls": N, "failed": M, "errors": [...]}``. Each thread moves flow runs of its own through
Pending -> Running -> Completed: orchestrated transitions, which read before they write.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

THREADS, RUNS_PER_THREAD = 8, 8


def _one_thread(flow_id: str, outcome: dict[str, Any], lock: threading.Lock) -> None:
    from prefect import get_client
    from prefect.states import Completed, Pending, Running

    def attempt(call: Any) -> Any:
        try:
            result, error = call(), None
        except Exception as exc:  # a 503 surfaces here: the client's retries are off
            result, error = None, repr(exc)[:200]
        with lock:
            outcome["calls"] += 1
            if error is not None:
                outcome["failed"] += 1
                outcome["errors"].append(error)
        return result

    with get_client(sync_client=True) as client:
        for _ in range(RUNS_PER_THREAD):
            run = attempt(lambda: client._client.post("/flow_runs/", json={"flow_id": flow_id}).json())
            for state in (Pending, Running, Completed) if run else ():
                attempt(lambda state=state, run_id=run["id"]: client.set_flow_run_state(run_id, state()))


def main() -> None:
    assert os.environ.get("PREFECT_CLIENT_MAX_RETRIES") == "0", "run with the client's retries off"
    from prefect import get_client

    with get_client(sync_client=True) as client:
        flow_id = client._client.post("/flows/", json={"name": "sqlite-stress"}).json()["id"]
    outcome: dict[str, Any] = {"calls": 0, "failed": 0, "errors": []}
    lock = threading.Lock()
    started = time.perf_counter()
    threads = [threading.Thread(target=_one_thread, args=(flow_id, outcome, lock)) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    outcome["seconds"] = round(time.perf_counter() - started, 3)
    outcome["errors"] = outcome["errors"][:5]
    json.dump(outcome, sys.stdout)


if __name__ == "__main__":
    main()
