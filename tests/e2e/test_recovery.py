"""Recovery: kill real processes with SIGKILL mid-work, restart them, lose and double nothing."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from uuid import UUID

from infra.engine.video import probe_mp4
from infra.heartbeat import claimed_task_runs
from infra.service import PROJECT_ROOT, Supervisor, apply_deployments, prefect_env, start_prefect_server
from infra.store.bucket import make_client
from tests.helpers import FAST_SPEC, drop, flow_runs_named, png_bytes, wait_for
from tests.ports import free_port


def _ledger_states(state_dir: Path) -> dict[str, str]:
    path = state_dir / "ledger.sqlite3"
    if not path.exists():
        return {}
    with sqlite3.connect(path, timeout=10) as db:
        try:
            return dict(db.execute("SELECT stem, state FROM jobs").fetchall())
        except sqlite3.OperationalError:  # the watcher created the file but not yet its tables
            return {}


def _rendering(stem: str) -> set[str]:
    """Render task runs a GPU worker's heartbeat claims, Running, for the job ``stem``: handed over
    at detection (named after the input) or submitted by its flow run (named ``stem-<job id>``)."""
    from prefect import get_client

    found = set()
    with get_client(sync_client=True) as client:
        for task_run_id in claimed_task_runs(stale_after=10):
            task_run = client.read_task_run(task_run_id)
            if not (task_run.state and task_run.state.is_running()):
                continue
            handed_over = task_run.flow_run_id is None and task_run.name == f"render-video-{stem}"
            if handed_over or (task_run.flow_run_id
                               and client.read_flow_run(task_run.flow_run_id).name.startswith(f"{stem}-")):
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
    orphan = wait_for(lambda: _rendering("long"), timeout=120, interval=0.5,
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
        # "done" counts too: a job submitted before the kill may finish before the last is submitted.
        past_submission = {"submitted", "done"}
        wait_for(lambda: len(_ledger_states(state)) == 8 and set(_ledger_states(state).values()) <= past_submission,
                 timeout=120, what="every job submitted after the restart")
        time.sleep(3)
    finally:
        watcher.send_signal(signal.SIGTERM)
        watcher.wait(20)
    with sqlite3.connect(state / "ledger.sqlite3") as db:
        names = [f"{stem}-{job_id[:6]}" for stem, job_id in db.execute("SELECT stem, job_id FROM jobs")]
    runs = flow_runs_named(names)
    assert sorted(run.name for run in runs) == sorted(names), "exactly one run per job"



def test_prefect_server_down_while_drops_arrive_loses_nothing(tmp_path: Path) -> None:
    home, state = tmp_path / "prefect-home", tmp_path / "state"
    env = prefect_env("", state, {"PREFECT_HOME": str(home)})
    env.pop("PREFECT_API_URL")
    server = Supervisor(env=env, log_dir=tmp_path / "logs")
    port = free_port()
    api = start_prefect_server(server, port, lambda _: None)
    env = prefect_env(api, state, {"PREFECT_HOME": str(home)})
    apply_deployments(env, "i2vflow", gpu_limit=1)
    server.stop("prefect-server")
    stopped_at = time.monotonic()
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    watcher = _watcher_process(env, inbox, outbox, state, tmp_path / "watcher.log")
    try:
        # A minute without a server, drops arriving at its start and in its middle.
        for index in range(5):
            if index == 3:
                time.sleep(max(0.0, 30 - (time.monotonic() - stopped_at)))
            drop(inbox, f"outage-{index}", {"prompt": "p", **FAST_SPEC}, png_bytes(color=(1, index * 40, 1)))
        wait_for(lambda: len(_ledger_states(state)) == 5, timeout=60, what="5 jobs recorded while the server is down")
        time.sleep(max(0.0, 60 - (time.monotonic() - stopped_at)))  # the watcher keeps retrying with back-off
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


def test_a_job_the_service_gave_up_on_renders_after_the_fix_with_i2vflow_retry(service, start_watcher,
                                                                               tmp_path: Path) -> None:
    """The outbox fails during publish (a file where the job's folder must go) and the reconciler
    gives up (one attempt allowed); the user's service_failed report waits until it can be
    written. Once the operator removes the obstacle, `i2vflow retry STEM` renders the job beside
    its input: the same flow run, one video, and the report removed."""
    inbox, outbox, state = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "state"
    outbox.mkdir()
    blocker = outbox / "blocked"
    blocker.write_text("a file where the output folder should be")
    drop(inbox, "blocked/item", {"prompt": "p", **FAST_SPEC}, png_bytes())
    handle = start_watcher(inbox, outbox, state_dir=state, reconcile_seconds=1.0, max_reschedules=1)
    wait_for(lambda: _final_run_state(handle), timeout=240, what="the run to fail in its publish")
    [record] = handle.watcher.ledger.in_state("submitted")
    time.sleep(3)  # three reconciler passes: it gave up, but the report cannot be written yet
    assert handle.watcher.ledger.get(record.ticket.job_id).state == "submitted"

    blocker.unlink()
    report = outbox / "blocked" / "item.error.json"
    wait_for(report.exists, timeout=60, what="the service_failed report once the outbox works")
    assert json.loads(report.read_text())["error"] == "service_failed"
    assert "i2vflow retry blocked/item" in json.loads(report.read_text())["retry"]
    assert _ledger_states(state) == {"blocked/item": "failed"}

    retry = subprocess.run([sys.executable, "-m", "infra.cli", "retry", "blocked/item", "never/dropped"],
                           env={**service.env, "I2VFLOW_STATE_DIR": str(state)}, cwd=PROJECT_ROOT,
                           capture_output=True, text=True, timeout=120)
    assert retry.returncode == 1, retry.stderr  # one name was refused
    assert f"rescheduled blocked/item: flow run {record.flow_run_id}" in retry.stdout
    assert "refused     never/dropped: no job of that name" in retry.stdout
    sidecar = outbox / "blocked" / "item.json"
    wait_for(sidecar.exists, timeout=180, what="the video after the retry")
    assert json.loads(sidecar.read_text())["prefect"]["flow_run_id"] == record.flow_run_id
    assert probe_mp4(outbox / "blocked" / "item.mp4").frames == 8
    assert not report.exists()
    wait_for(lambda: _ledger_states(state) == {"blocked/item": "done"}, timeout=30, what="the ledger to say done")
    from prefect import get_client

    with get_client(sync_client=True) as client:
        name = client.read_flow_run(record.flow_run_id).name
    assert [r.id for r in flow_runs_named([name])] == [UUID(record.flow_run_id)]  # no second run


def _final_run_state(handle) -> object:
    from prefect import get_client

    records = handle.watcher.ledger.in_state("submitted")
    if not records:
        return None
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(records[0].flow_run_id).state
    return state if state and state.is_final() else None


def _job_runs(handle) -> dict[str, str]:
    """Input stem -> flow-run id of every job the watcher has submitted."""
    records = handle.watcher.ledger.in_state("submitted", "done", "failed")
    return {record.ticket.stem: record.flow_run_id for record in records if record.flow_run_id}


def _task_runs(flow_run_id: str, name: str) -> list:
    """Task runs of one flow run whose name starts with ``name`` (render-video, publish-video)."""
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId, TaskRunFilterName

    with get_client(sync_client=True) as client:
        return client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[UUID(flow_run_id)]), name=TaskRunFilterName(like_=f"{name}%")))


def test_flow_worker_killed_with_runs_in_flight_recovers_each_job_once(service, start_watcher, tmp_path: Path) -> None:
    from prefect import get_client

    from infra.orchestrator import read_run_states

    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    stems = [f"host-{i}" for i in range(4)]
    # Renders of ~7 s, not FAST_SPEC's ~2 s: a flow worker woken at each new run starts them as fast
    # as the watcher creates them, and 2 s renders could each end before the next run is Running.
    for index, stem in enumerate(stems):
        drop(inbox, stem, {"prompt": stem, **FAST_SPEC, "steps": 40}, png_bytes(color=(index * 60, 120, 1)))
    handle = start_watcher(inbox, outbox, reconcile_seconds=2.0)

    def in_flight(*states: str) -> dict[str, str]:
        runs = _job_runs(handle)
        found = read_run_states(list(runs.values())) if runs else {}
        return {stem: run for stem, run in runs.items() if found.get(run, ("",))[0] in states}

    # Running is set by the flow-run process itself: then there are processes to kill.
    wait_for(lambda: len(in_flight("RUNNING")) >= 2, timeout=120, interval=0.2, what="two runs running")
    killed = service.crash_flow_worker()
    killed_at, killed_wall = time.monotonic(), time.time()
    caught = in_flight("PENDING", "RUNNING")  # read after the kill: these runs lost their processes with the worker
    assert len(caught) >= 2 and killed, (caught, killed)
    service.start_flow_worker()

    wait_for(lambda: all((outbox / f"{stem}.json").exists() for stem in stems), timeout=240,
             what="every video after the flow worker was killed")
    recovery_seconds = time.monotonic() - killed_at
    wait_for(lambda: {s for s, _ in read_run_states(list(caught.values())).values()} == {"COMPLETED"},
             timeout=60, what="the recovered runs to complete")
    expected = {f"{stem}{suffix}" for stem in stems for suffix in (".mp4", ".json")}
    assert {p.name for p in outbox.iterdir()} == expected
    assert all(probe_mp4(outbox / f"{stem}.mp4").frames == FAST_SPEC["num_frames"] for stem in stems)
    runs = _job_runs(handle)
    names = [f"{stem}-{json.loads((outbox / f'{stem}.json').read_text())['job_id'][:6]}" for stem in stems]
    assert sorted(run.name for run in flow_runs_named(names)) == sorted(names), "exactly one run per job"
    crashed_after = []
    with get_client(sync_client=True) as client:
        for stem, run_id in caught.items():
            history = client.read_flow_run_states(run_id)
            crashes = [s for s in history if s.is_crashed() and (s.message or "").startswith("no heartbeat")]
            assert crashes, f"{stem}: the zombie automation never crashed it: {[s.name for s in history]}"
            assert runs[stem] == run_id, "the job kept its run"
            crashed_after.append(crashes[0].timestamp.timestamp() - killed_wall)
    print(f"flow worker killed with {len(caught)} runs in flight: crashed by the automation "
          f"{min(crashed_after):.1f}-{max(crashed_after):.1f} s after the kill; "
          f"all {len(stems)} videos {recovery_seconds:.1f} s after the kill")


def test_s3_down_from_render_to_publish_fails_clearly_then_one_video(service, start_watcher, s3_moto, s3_server,
                                                                     s3_bucket, tmp_path: Path) -> None:
    """The outbox bucket's server is stopped once the run exists, before its render (the inputs come
    from a folder, so publish is the run's first S3 request), and stays down until the run has failed."""
    from infra.orchestrator import read_run_states

    client, bucket = s3_bucket
    inbox, video_key, sidecar_key = tmp_path / "inbox", "outbox/item.mp4", "outbox/item.json"
    drop(inbox, "item", {"prompt": "p", "num_frames": 8, "steps": 20}, png_bytes())
    handle = start_watcher(inbox, f"s3://{bucket}/outbox", reconcile_seconds=2.0, **s3_server.settings_kwargs())
    # Stopped as soon as the run exists: nothing in a run touches the outbox before publish, so the
    # outage spans the render and the publish without racing a fast tiny-model render.
    run_id = wait_for(lambda: _job_runs(handle).get("item"), timeout=60, interval=0.1, what="the run")
    seen: set[tuple[int, str]] = set()  # every version of the video key that was ever visible
    watching = threading.Event()
    looker = make_client(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, retries=0)

    def watch_video_key() -> None:
        while not watching.is_set():
            with contextlib.suppress(Exception):  # refused while the server is down
                stat = looker.stat_object(bucket, video_key)
                seen.add((stat.size or 0, stat.etag or ""))
            time.sleep(0.2)

    watcher_thread = threading.Thread(target=watch_video_key, daemon=True)
    watcher_thread.start()
    s3_moto.stop()
    down_wall = time.time()
    try:
        failed = wait_for(lambda: _failed_state(run_id), timeout=240, what="the run to fail while S3 is down")
    finally:
        s3_moto.start()
    up_at = time.monotonic()
    publish = _task_runs(run_id, "publish-video")
    assert publish and publish[0].start_time.timestamp() > down_wall, "published before the outage"
    assert f"StoreError: s3 bucket check of s3://{bucket}/outbox/" in failed.message, failed.message
    assert "Connection refused" in failed.message, failed.message

    def sidecar() -> dict | None:
        with contextlib.suppress(Exception):
            return json.loads(client.get_object(bucket, sidecar_key).read())
        return None

    written = wait_for(sidecar, timeout=240, what="the video once S3 is back")
    recovery_seconds = time.monotonic() - up_at
    wait_for(lambda: seen, timeout=30, what="the watching thread to see the video")
    watching.set()
    watcher_thread.join(5)
    final = client.stat_object(bucket, video_key)
    assert seen == {(final.size, final.etag)}, f"another version was visible under the video key: {seen}"
    assert written["video"]["bytes"] == final.size
    assert sorted(o.object_name for o in client.list_objects(bucket, prefix="outbox/", recursive=True)) == [
        sidecar_key, video_key]
    local = tmp_path / "item.mp4"
    client.fget_object(bucket, video_key, str(local))
    assert probe_mp4(local).frames == 8
    assert [run.id for run in flow_runs_named([f"item-{written['job_id'][:6]}"])] == [UUID(run_id)]
    wait_for(lambda: read_run_states([run_id])[run_id][0] == "COMPLETED", timeout=60, what="the run to complete")
    print(f"S3 down from render until the run failed ({failed.timestamp.timestamp() - down_wall:.1f} s); "
          f"video {recovery_seconds:.1f} s after S3 was back")


def _failed_state(flow_run_id: str) -> object:
    """The run's first Failed state, from its history: the reconciler may reschedule it at once."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return next((s for s in client.read_flow_run_states(flow_run_id) if s.is_failed()), None)
