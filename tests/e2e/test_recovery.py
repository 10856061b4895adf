"""Recovery: kill real processes with SIGKILL mid-work, restart them, lose and double nothing."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from infra.engine.video import probe_mp4
from infra.heartbeat import claimed_task_runs
from infra.service import PROJECT_ROOT, Supervisor, apply_deployments, prefect_env, start_prefect_server
from tests.helpers import FAST_SPEC, drop, flow_runs_named, png_bytes, wait_for


def _ledger_states(state_dir: Path) -> dict[str, str]:
    path = state_dir / "ledger.sqlite3"
    if not path.exists():
        return {}
    with sqlite3.connect(path, timeout=10) as db:
        return dict(db.execute("SELECT stem, state FROM jobs").fetchall())


def _rendering(run_name_prefix: str) -> set[str]:
    """Render task runs a GPU worker's heartbeat claims, Running, for flow runs named so."""
    from prefect import get_client

    found = set()
    with get_client(sync_client=True) as client:
        for task_run_id in claimed_task_runs(stale_after=10):
            task_run = client.read_task_run(task_run_id)
            running = bool(task_run.state and task_run.state.is_running() and task_run.flow_run_id)
            if running and client.read_flow_run(task_run.flow_run_id).name.startswith(run_name_prefix):
                found.add(task_run_id)
    return found


def _watcher_process(env: dict[str, str], inbox: Path, outbox: Path, state: Path, log: Path) -> subprocess.Popen:
    env = {**env, "I2VFLOW_INBOX": str(inbox), "I2VFLOW_OUTBOX": str(outbox), "I2VFLOW_STATE_DIR": str(state),
           "I2VFLOW_RESCAN_SECONDS": "1", "I2VFLOW_SETTLE_SECONDS": "0.3", "I2VFLOW_SUBMIT_LEASE_SECONDS": "3"}
    return subprocess.Popen([sys.executable, "-m", "infra.cli", "watch"], env=env, cwd=PROJECT_ROOT,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def test_gpu_worker_killed_mid_render_is_resubmitted_and_finishes(service, start_watcher, tmp_path: Path) -> None:
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    slow = {"prompt": "a long render", "num_frames": 24, "steps": 60, "width": 128, "height": 128}
    drop(inbox, "long", slow, png_bytes())
    start_watcher(inbox, outbox)
    old_pid = service.supervisor.children["gpu-worker"].pid
    orphan = wait_for(lambda: _rendering("long-"), timeout=120, interval=0.5,
                      what="the GPU worker to start rendering this job")
    service.supervisor.stop("gpu-worker", sig=signal.SIGKILL)
    killed_at = time.monotonic()
    service.restart_gpu_worker()

    sidecar_path = outbox / "long.json"
    wait_for(sidecar_path.exists, timeout=300, what="video after the GPU worker was killed")
    recovery_seconds = time.monotonic() - killed_at
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["engine"]["pid"] != old_pid
    assert probe_mp4(outbox / "long.mp4").frames == 24
    from prefect import get_client

    with get_client(sync_client=True) as client:
        state = client.read_task_run(next(iter(orphan))).state
    assert state.is_crashed(), state
    print(f"GPU worker killed mid-render: video {recovery_seconds:.1f} s after the kill")


def test_watcher_killed_with_jobs_pending_gives_each_job_one_run(service, tmp_path: Path) -> None:
    inbox, outbox, state = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "state"
    stems = [f"burst-{i}" for i in range(8)]
    for index, stem in enumerate(stems):
        drop(inbox, stem, {"prompt": stem, **FAST_SPEC}, png_bytes(color=(index * 30, 1, 1)))
    watcher = _watcher_process(service.env, inbox, outbox, state, tmp_path / "watcher.log")
    wait_for(lambda: "submitted" in _ledger_states(state).values(), timeout=120, interval=0.05,
             what="the first run to be created")
    watcher.send_signal(signal.SIGKILL)
    watcher.wait(10)
    assert set(_ledger_states(state).values()) != {"submitted"}, "killed too late to test anything"
    watcher = _watcher_process(service.env, inbox, outbox, state, tmp_path / "watcher.log")
    try:
        wait_for(lambda: len(_ledger_states(state)) == 8 and set(_ledger_states(state).values()) == {"submitted"},
                 timeout=120, what="every job submitted after the restart")
        time.sleep(3)
    finally:
        watcher.send_signal(signal.SIGTERM)
        watcher.wait(20)
    with sqlite3.connect(state / "ledger.sqlite3") as db:
        names = [f"{stem}-{job_id[:6]}" for stem, job_id in db.execute("SELECT stem, job_id FROM jobs")]
    runs = flow_runs_named(names)
    assert sorted(run.name for run in runs) == sorted(names), "exactly one run per job"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_prefect_server_down_while_drops_arrive_loses_nothing(tmp_path: Path) -> None:
    home, state = tmp_path / "prefect-home", tmp_path / "state"
    env = prefect_env("", state, {"PREFECT_HOME": str(home)})
    env.pop("PREFECT_API_URL")
    server = Supervisor(env=env, log_dir=tmp_path / "logs")
    port = _free_port()
    api = start_prefect_server(server, port, lambda _: None)
    env = prefect_env(api, state, {"PREFECT_HOME": str(home)})
    apply_deployments(env, "i2vflow", gpu_limit=1)
    server.stop("prefect-server")
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    watcher = _watcher_process(env, inbox, outbox, state, tmp_path / "watcher.log")
    try:
        for index in range(5):
            drop(inbox, f"outage-{index}", {"prompt": "p", **FAST_SPEC}, png_bytes(color=(1, index * 40, 1)))
        wait_for(lambda: len(_ledger_states(state)) == 5, timeout=60, what="5 jobs recorded while the server is down")
        time.sleep(15)  # the server stays down; the watcher keeps retrying with back-off
        assert set(_ledger_states(state).values()) <= {"detected", "submitting"}
        restarted_at = time.monotonic()
        start_prefect_server(server, port, lambda _: None)
        wait_for(lambda: set(_ledger_states(state).values()) == {"submitted"}, timeout=150,
                 what="runs created once the server is back")
        print(f"server back -> all runs created in {time.monotonic() - restarted_at:.1f} s")
        from prefect import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            runs = client.read_flow_runs()
        outage_runs = sorted(run.name.rsplit("-", 1)[0] for run in runs if run.name.startswith("outage-"))
        assert outage_runs == [f"outage-{i}" for i in range(5)]
    finally:
        watcher.send_signal(signal.SIGTERM)
        watcher.wait(20)
        server.stop()


def test_outbox_failing_during_publish_fails_the_run_clearly_with_no_partial_video(start_watcher, tmp_path: Path):
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    outbox.mkdir()
    (outbox / "blocked").write_text("a file where the output folder should be")
    drop(inbox, "blocked/item", {"prompt": "p", **FAST_SPEC}, png_bytes())
    handle = start_watcher(inbox, outbox)
    job_state = wait_for(lambda: _final_run_state(handle), timeout=240, what="the run to end")
    assert job_state.is_failed(), job_state
    assert "Not a directory" in job_state.message or "StoreError" in job_state.message, job_state.message
    leftovers = [p for p in outbox.rglob("*") if p.name != "blocked"]
    assert leftovers == [], f"nothing half-written may appear: {leftovers}"


def _final_run_state(handle) -> object:
    from prefect import get_client

    records = handle.watcher.ledger.in_state("submitted")
    if not records:
        return None
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(records[0].flow_run_id).state
    return state if state and state.is_final() else None
