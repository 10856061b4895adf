"""`i2vflow retry`'s decisions over a real ledger after the real reconciler gave up.

The Prefect side is given as plain functions (states by run id, a reschedule call), as in
test_reconcile; tests/e2e/test_recovery.py runs the command against a real server.
"""

from __future__ import annotations

from pathlib import Path

from infra.jobs import JobTicket
from infra.ledger import Ledger
from infra.store.folder import FolderStore
from infra.watch.reconcile import reconcile
from infra.watch.retry import retry_failed

STATES = {"run-gpu-down": ("CRASHED", "worker lost"), "run-disk-full": ("FAILED", "StoreError: No space left"),
          "run-bad": ("FAILED", "bad input: bad.json: num_frames ..."),
          "run-superseded": ("CANCELLED", "input changed")}


def _failed_ledger(tmp_path: Path) -> Ledger:
    """Four jobs the reconciler recorded as failed, each for its own reason (max_attempts=1)."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    for job_id in ("gpu-down", "disk-full", "bad", "superseded"):
        ledger.record_detected(JobTicket(job_id=job_id, stem=f"shoes/{job_id}", inbox="/in", outbox=str(tmp_path),
                                         image_key=f"shoes/{job_id}.png", spec_key=None))
        ledger.claim(job_id, "me", 60)
        ledger.mark_submitted(job_id, f"run-{job_id}")
    reconcile(ledger, FolderStore(tmp_path), lambda ids: {i: STATES[i] for i in ids}, lambda *_: None, max_attempts=1)
    assert {r.ticket.job_id for r in ledger.in_state("failed")} == {"gpu-down", "disk-full", "bad", "superseded"}
    return ledger


def test_retry_all_reschedules_what_the_service_failed_and_refuses_the_inputs_own_failures(tmp_path: Path) -> None:
    ledger = _failed_ledger(tmp_path)
    rescheduled: list[str] = []

    outcomes = retry_failed(ledger, None, lambda ids: {i: STATES[i] for i in ids},
                            lambda run_id, reason: rescheduled.append(run_id))

    assert sorted(rescheduled) == ["run-disk-full", "run-gpu-down"]
    actions = {o.stem: o.action for o in outcomes}
    assert actions == {"shoes/gpu-down": "rescheduled", "shoes/disk-full": "rescheduled",  # under --all the
                       "shoes/bad": "skipped", "shoes/superseded": "skipped"}  # input's own failures are skipped
    why = {o.stem: o.detail for o in outcomes}
    assert "fix the input" in why["shoes/bad"] and "cancelled" in why["shoes/superseded"]
    # Followed again like a new submission: fresh attempts, so the reconciler may reschedule it once more.
    record = ledger.get("gpu-down")
    assert (record.state, record.attempts, record.last_error) == ("submitted", 1, None)
    assert ledger.get("bad").state == "failed"


def test_retry_by_stem_and_a_run_gone_from_the_server(tmp_path: Path) -> None:
    ledger = _failed_ledger(tmp_path)

    outcomes = retry_failed(ledger, ["shoes/gpu-down", "shoes/never-dropped"], lambda ids: {},  # the server forgot
                            lambda run_id, reason: None)

    assert [(o.stem, o.action) for o in outcomes] == [("shoes/never-dropped", "refused"),
                                                       ("shoes/gpu-down", "resubmitted")]
    assert ledger.get("gpu-down").state == "detected" and "gpu-down" in ledger.claimable()
    assert ledger.get("disk-full").state == "failed"  # not named, not touched
    # Named again now that it is waiting for its new run: not failed, and the answer says what it is.
    [again] = retry_failed(ledger, ["shoes/gpu-down"], lambda ids: {}, lambda run_id, reason: None)
    assert (again.action, again.detail.split(",")[0]) == ("refused", "its job is detected")


def test_a_named_job_that_failed_because_of_its_input_is_refused_with_the_reason(tmp_path: Path) -> None:
    ledger = _failed_ledger(tmp_path)
    rescheduled: list[str] = []

    [outcome] = retry_failed(ledger, ["shoes/bad"], lambda ids: {i: STATES[i] for i in ids},
                             lambda run_id, reason: rescheduled.append(run_id))

    assert (outcome.action, rescheduled) == ("refused", [])
    assert "bad input: bad.json" in outcome.detail and "fix the input and drop it again" in outcome.detail
    assert ledger.get("bad").state == "failed"
