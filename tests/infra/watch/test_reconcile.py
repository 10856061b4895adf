"""The reconciler's decisions over a real ledger and a real outbox folder.

The Prefect side is given as plain functions (states by run id, a reschedule call); the e2e
recovery tests run it against a real server.
"""

from __future__ import annotations

import json
from pathlib import Path

from infra.jobs import JobTicket
from infra.ledger import Ledger
from infra.store.folder import FolderStore
from infra.watch.reconcile import findings_markdown, reconcile


def _submitted(ledger: Ledger, job_id: str) -> None:
    ledger.record_detected(JobTicket(job_id=job_id, stem=job_id, inbox="/in", outbox="/out", image_key=f"{job_id}.png",
                                     spec_key=None))
    ledger.claim(job_id, "me", 60)
    ledger.mark_submitted(job_id, f"run-{job_id}")


def test_reconcile_settles_retries_and_resubmits(tmp_path: Path) -> None:
    ledger, outbox = Ledger(tmp_path / "l.sqlite3"), FolderStore(tmp_path / "out")
    for job_id in ("ok", "bad", "crashed", "store-down", "gone"):
        _submitted(ledger, job_id)
    states = {"run-ok": ("COMPLETED", ""), "run-bad": ("FAILED", "bad input: x.json: ..."),
              "run-crashed": ("CRASHED", "process killed"), "run-store-down": ("FAILED", "StoreError: unreachable")}
    rescheduled: list[str] = []
    outbox.write("half.mp4", b"video without sidecar")

    findings = reconcile(ledger, outbox, lambda ids: {i: states[i] for i in ids if i in states},
                         lambda run_id, reason: rescheduled.append(run_id), max_attempts=3)

    assert ledger.get("ok").state == "done" and ledger.get("bad").state == "failed"
    assert sorted(rescheduled) == ["run-crashed", "run-store-down"]
    assert ledger.get("gone").state == "detected" and "gone" in ledger.claimable()
    kinds = sorted(f.kind for f in findings)
    assert kinds == ["run_missing", "run_rescheduled", "run_rescheduled", "video_without_sidecar"]
    assert "half" in findings_markdown(findings)


def test_reconcile_gives_up_after_max_attempts(tmp_path: Path) -> None:
    ledger, outbox = Ledger(tmp_path / "l.sqlite3"), FolderStore(tmp_path / "out")
    _submitted(ledger, "flaky")
    calls: list[str] = []
    for _ in range(2):
        reconcile(ledger, outbox, lambda ids: {i: ("CRASHED", "worker lost") for i in ids},
                  lambda run_id, reason: calls.append(run_id), max_attempts=3)
    assert not (tmp_path / "out" / "flaky.error.json").exists()  # still being retried: no verdict yet
    for _ in range(2):
        reconcile(ledger, outbox, lambda ids: {i: ("CRASHED", "worker lost") for i in ids},
                  lambda run_id, reason: calls.append(run_id), max_attempts=3)
    assert len(calls) == 2 and ledger.get("flaky").state == "failed"
    # Giving up is never silent: the user gets an error file that says it is not their input.
    report = json.loads((tmp_path / "out" / "flaky.error.json").read_text())
    assert report["error"] == "service_failed" and report["job_id"] == "flaky"
    assert "worker lost" in report["message"] and "i2vflow doctor" in report["retry"]
    assert report["inputs"] == {"image": "flaky.png", "spec": None}


def test_giving_up_waits_until_the_error_file_can_be_written(tmp_path: Path) -> None:
    """The outbox may be what failed (a full disk, a file where a folder must be): a job marked
    failed without its error file would end in silence, so the verdict waits for the write."""
    ledger, outbox = Ledger(tmp_path / "l.sqlite3"), FolderStore(tmp_path / "out")
    _submitted(ledger, "shoes-red")
    (tmp_path / "out" / "shoes-red.error.json").mkdir(parents=True)  # where the report must go: blocked

    def once() -> list[object]:
        return reconcile(ledger, outbox, lambda ids: {i: ("FAILED", "StoreError: cannot write") for i in ids},
                         lambda run_id, reason: None, max_attempts=1)

    [finding] = once()
    assert finding.kind == "run_gave_up" and "not written yet" in finding.action
    assert ledger.get("shoes-red").state == "submitted"
    (tmp_path / "out" / "shoes-red.error.json").rmdir()
    [finding] = once()
    assert finding.action == "marked failed after 1 attempts" and ledger.get("shoes-red").state == "failed"
    assert json.loads((tmp_path / "out" / "shoes-red.error.json").read_text())["error"] == "service_failed"
