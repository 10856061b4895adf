"""A flood of drops at once: every job exactly one flow run, none twice, even with a second
watcher and a restart; the same into a bucket. (Small versions of benchmarks/bench_load.py.)

The runs go to a deployment on a work pool with no worker, and the watchers hand no render over
(nothing would await those renders), so the test measures the watcher and the server, not 60
renders on a 2-core CI machine; rendering is covered elsewhere.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.bench_load import drop_all
from infra.service import PROJECT_ROOT
from tests.helpers import drop, flow_runs_named, png_bytes, wait_for, wait_for_scans

JOBS = 60
BUCKET_JOBS = 30


@pytest.fixture(scope="module")
def idle_deployment(service) -> str:
    """generate-video deployed again as `load-test` on a pool that no worker serves."""
    def prefect(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "prefect", *args], env=service.env, cwd=PROJECT_ROOT,
                       check=True, capture_output=True, timeout=180)

    prefect("work-pool", "create", "i2vflow-idle", "--type", "process")
    prefect("--no-prompt", "deploy", "flows.generate.generate_video", "--name", "load-test", "--pool", "i2vflow-idle")
    return "generate-video/load-test"


def test_a_flood_of_drops_gives_exactly_one_run_per_job(start_watcher, idle_deployment: str, tmp_path: Path) -> None:
    inbox, outbox, state = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "state"
    first = start_watcher(inbox, outbox, state, deployment=idle_deployment, early_render=False)
    # Another ledger:
    start_watcher(inbox, outbox, tmp_path / "second-state", deployment=idle_deployment, early_render=False)
    image = png_bytes()
    for index in range(JOBS):
        drop(inbox, f"flood/{index:03d}", {"prompt": f"item {index}"}, image)
    last_drop = time.monotonic()
    wait_for(lambda: first.watcher.ledger.counts().get("submitted") == JOBS, timeout=240,
             what=f"{JOBS} runs created")
    print(f"{JOBS} jobs: last drop -> last run created {time.monotonic() - last_drop:.1f} s")
    records = first.watcher.ledger.in_state("submitted")
    first.stop()
    # A restart on the same ledger:
    restarted = start_watcher(inbox, outbox, state, deployment=idle_deployment, early_render=False)
    wait_for_scans(restarted.watcher)
    names = [f"{index:03d}-{r.ticket.job_id[:6]}" for index, r in
             sorted((int(r.ticket.stem.rsplit("/", 1)[1]), r) for r in records)]
    runs = flow_runs_named(names)
    assert len(names) == JOBS and sorted(r.name for r in runs) == sorted(names), "one run per job, none twice"


def test_a_flood_into_a_bucket_gives_exactly_one_run_per_job(start_watcher, idle_deployment: str, s3_server,
                                                             s3_bucket, tmp_path: Path) -> None:
    """The benchmark's own dropper puts the pairs into the session's S3 server; two watchers with
    their own ledgers list the bucket (one run per job: the idempotency key)."""
    _, bucket = s3_bucket
    inbox, outbox = f"s3://{bucket}/inbox", f"s3://{bucket}/outbox"
    s3 = {"deployment": idle_deployment, "early_render": False, "poll_seconds": 1.0, **s3_server.settings_kwargs()}
    watchers = [start_watcher(inbox, outbox, tmp_path / name, **s3) for name in ("state", "second-state")]
    drop_all(inbox, s3_server, BUCKET_JOBS, False, {}, tmp_path / "dropped.json")
    for handle in watchers:
        wait_for(lambda h=handle: h.watcher.ledger.counts().get("submitted") == BUCKET_JOBS, timeout=240,
                 what=f"{BUCKET_JOBS} runs created")
    first, second = ({r.ticket.run_name: r.flow_run_id for r in h.watcher.ledger.in_state("submitted")}
                     for h in watchers)
    assert first == second, "both watchers got the same run for each job"
    runs = flow_runs_named(list(first))
    assert len(first) == BUCKET_JOBS and sorted(str(r.id) for r in runs) == sorted(first.values()), "one run per job"
