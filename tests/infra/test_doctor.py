"""``i2vflow doctor`` against the real session Prefect server and the real workers.

All OK on the running service; then each broken part (a wrong inbox, a deployment name that
does not exist, a dead API URL) is named as the problem, with a fix, and the exit code says so.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from infra.doctor import OK, PROBLEM, SKIPPED, WARN, run_checks
from infra.service import PROJECT_ROOT
from infra.settings import Settings
from tests.helpers import wait_for
from tests.ports import free_port


@pytest.fixture
def settings(service, prefect_api: str, tiny_model_cache: Path, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings of a healthy host, once the service's workers are up: each test then breaks one thing,
    and its other checks must stay OK whichever test runs first."""
    monkeypatch.setenv("PATH", service.env["PATH"])  # the doctor judges the PATH the workers have
    (tmp_path / "inbox").mkdir()
    (tmp_path / "outbox").mkdir()
    settings = Settings(inbox=str(tmp_path / "inbox"), outbox=str(tmp_path / "outbox"),
                        state_dir=tmp_path / "state", model_cache=tiny_model_cache,
                        gpu_worker_metrics_port=int(service.env["I2VFLOW_GPU_WORKER_METRICS_PORT"]))
    # The service fixture does not wait for its workers; neither does an operator after `up`.
    # (A GPU worker killed by another test stays listed by Prefect until its socket is found dead.)
    workers = ("work pool", "gpu task worker")
    wait_for(lambda: all(run_checks(settings, prefect_api).get(name).status == OK for name in workers),
             timeout=180, interval=2, what="the workers to come up")
    return settings


def _doctor_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infra.cli", "doctor", *args], env=env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_all_ok_on_the_running_service(service, prefect_api: str, settings: Settings) -> None:
    reports = []
    try:
        wait_for(lambda: reports.append(run_checks(settings, prefect_api)) or
                 all(c.status == OK for c in reports[-1].checks), timeout=60, interval=2,
                 what="every check to pass")
    finally:
        text = reports[-1].render()
        print(text)
    report = reports[-1]
    assert {c.name: c.status for c in report.checks} == {
        "prefect server": OK, "work pool": OK, "deployment": OK, "flow command": OK, "gpu concurrency limit": OK,
        "gpu task worker": OK, "gpu worker metrics": OK, "inbox": OK, "outbox": OK, "state dir": OK,
        "model cache": OK}, text
    assert "live worker" in report.get("work pool").detail
    assert "model load" in report.get("gpu worker metrics").detail
    assert not list((Path(settings.outbox)).iterdir()), "the outbox probe must be removed"

    env = {**service.env, "I2VFLOW_INBOX": settings.inbox, "I2VFLOW_OUTBOX": settings.outbox,
           "I2VFLOW_STATE_DIR": str(settings.state_dir)}
    result = _doctor_cli(env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout and "PROBLEM" not in result.stdout


def test_too_few_gpu_slots_for_staged_renders_is_a_warning_with_the_number(service, prefect_api: str,
                                                                          settings: Settings) -> None:
    """The session's limit (2) fits its one GPU worker x 2 slots; a fleet set to 3 slots does not."""
    check = run_checks(settings.model_copy(update={"gpu_worker_slots": 3}), prefect_api).get("gpu concurrency limit")
    assert check.status == WARN, check
    assert "2 slot(s) for 1 GPU worker(s) x 3" in check.detail
    assert check.fix == "`prefect concurrency-limit create gpu 3`"


def test_flow_command_on_a_path_without_this_environment_is_a_problem_with_a_fix(
        service, prefect_api: str, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """prefect.yaml starts flow runs as `python3 -m infra.forkserver run prefect.engine`: a worker
    whose PATH finds no python3, or another environment's, would fail every run; the doctor names
    the interpreter."""
    monkeypatch.setenv("PATH", str(tmp_path))
    check = run_checks(settings, prefect_api).get("flow command")
    assert check.status == PROBLEM, check
    assert "'python3' of 'python3 -m infra.forkserver run prefect.engine' is not on PATH" in check.detail
    assert str(Path(sys.executable).parent) in check.fix

    other = tmp_path / "python3"  # an interpreter of some other environment
    other.write_text("#!/bin/sh\necho /opt/other-env\n")
    other.chmod(0o755)
    check = run_checks(settings, prefect_api).get("flow command")
    assert check.status == PROBLEM and f"is {other} (environment /opt/other-env)" in check.detail, check

    monkeypatch.setenv("PATH", service.env["PATH"])
    check = run_checks(settings, prefect_api).get("flow command")
    assert check.status == OK and "runs " in check.detail, check


def test_a_wrong_inbox_is_named_with_a_fix(prefect_api: str, settings: Settings, tmp_path: Path) -> None:
    missing = tmp_path / "inbx"  # a typo
    report = run_checks(settings.model_copy(update={"inbox": str(missing)}), prefect_api)
    inbox = report.get("inbox")
    assert (inbox.status, report.ok) == (PROBLEM, False)
    assert str(missing) in inbox.detail and "does not exist" in inbox.detail
    assert "I2VFLOW_INBOX" in inbox.fix
    assert not missing.exists(), "the doctor must not create the folder it checks"
    assert [c.name for c in report.checks if c.status == PROBLEM] == ["inbox"]

    a_file = tmp_path / "outbox-file"
    a_file.write_text("x")
    report = run_checks(settings.model_copy(update={"outbox": str(a_file)}), prefect_api)
    assert report.get("outbox").status == PROBLEM and "not a folder" in report.get("outbox").detail


def test_a_missing_deployment_is_named_with_a_fix(prefect_api: str, settings: Settings) -> None:
    report = run_checks(settings.model_copy(update={"deployment": "generate-video/no-such"}), prefect_api)
    check = report.get("deployment")
    assert check.status == PROBLEM and "'generate-video/no-such' does not exist" in check.detail
    assert "prefect --no-prompt deploy --all" in check.fix
    assert [c.name for c in report.checks if c.status == PROBLEM] == ["deployment"]


def test_a_dead_api_url_fails_with_exit_code_1(service, settings: Settings) -> None:
    dead = f"http://127.0.0.1:{free_port()}/api"
    report = run_checks(settings, dead)
    assert report.get("prefect server").status == PROBLEM and dead in report.get("prefect server").detail
    assert {report.get(n).status for n in ("work pool", "deployment", "gpu task worker")} == {SKIPPED}
    env = {**service.env, "PREFECT_API_URL": dead, "I2VFLOW_INBOX": settings.inbox,
           "I2VFLOW_OUTBOX": settings.outbox, "I2VFLOW_STATE_DIR": str(settings.state_dir)}
    result = _doctor_cli(env, "--gpu-metrics", "")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"PROBLEM  prefect server         {dead} does not answer" in result.stdout
    assert "fix: start it" in result.stdout and "1 problem(s) found" in result.stdout


def test_the_state_dir_check_counts_failed_jobs_and_names_the_retry_command(tmp_path: Path) -> None:
    from infra.doctor import _check_state_dir
    from infra.jobs import JobTicket
    from infra.ledger import Ledger

    settings = Settings(state_dir=tmp_path / "state")
    settings.state_dir.mkdir()
    ledger = Ledger(settings.ledger_path)
    for job_id in ("done", "gave-up"):
        ledger.record_detected(JobTicket(job_id=job_id, stem=job_id, inbox="/in", outbox="/out",
                                         image_key=f"{job_id}.png", spec_key=None))
        ledger.claim(job_id, "me", 60)
        ledger.mark_submitted(job_id, f"run-{job_id}")
    ledger.mark_finished("done", ok=True)
    ledger.mark_finished("gave-up", ok=False, error="flow run run-gave-up crashed: worker lost")
    ledger.close()

    check = _check_state_dir(settings)

    assert check.status == OK and "2 job(s), 0 waiting for a run, 1 failed" in check.detail
    assert "`i2vflow retry --all`" in check.detail
