"""The reconciler: compare the ledger with Prefect's runs and the outbox, repair what crashes left.

Why in the watcher: the ledger is the watcher's own record, and the watcher already runs a loop;
every ``reconcile_seconds`` it asks the server about the jobs it believes submitted.
- Completed runs -> ledger ``done``; runs that ended Failed because of the input (bad input,
  the model refusing it) -> ``failed``: final, the user has an error file.
- Crashed runs, or runs that failed for an operational reason (store or server unreachable,
  GPU worker lost), are rescheduled through Prefect (the same run, so still exactly once), at
  most ``max_attempts`` times; then ``failed``, with a ``service_failed`` error file for the user.
- A submitted job whose run no longer exists goes back to ``detected`` and is resubmitted.
- Videos in the outbox without a sidecar (a publish cut short) are reported.
Findings go to the logs and, when there are any, to a Prefect markdown artifact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog

from infra.jobs import JobTicket
from infra.ledger import Ledger
from infra.spec import ErrorReport, error_file_bytes
from infra.store.base import Store, StoreError

log = structlog.get_logger("i2vflow.reconciler")
FINAL_FOR_USER = ("bad input:", "render failed:")


def is_final_for_user(state: str, message: str) -> bool:
    """A run that ended because of the job itself (its input, or a cancellation): no retry helps."""
    return state == "CANCELLED" or (state == "FAILED" and message.startswith(FINAL_FOR_USER))


@dataclass(frozen=True)
class Finding:
    kind: str
    job_id: str | None
    stem: str
    detail: str
    action: str


def reconcile(ledger: Ledger, outbox: Store, read_states: Callable[[list[str]], dict[str, tuple[str, str]]],
              reschedule: Callable[[str, str], None], max_attempts: int = 3) -> list[Finding]:
    """One pass: 1. submitted jobs vs their runs, 2. outbox videos vs sidecars."""
    findings: list[Finding] = []
    submitted = {r.flow_run_id: r for r in ledger.in_state("submitted") if r.flow_run_id}
    states = read_states(list(submitted)) if submitted else {}
    for run_id, record in submitted.items():
        job_id, stem = record.ticket.job_id, record.ticket.stem
        state, message = states.get(run_id, ("MISSING", ""))
        if state == "COMPLETED":
            ledger.mark_finished(job_id, ok=True)
        elif is_final_for_user(state, message):
            ledger.mark_finished(job_id, ok=False, error=message[:2000])
        elif state in ("CRASHED", "FAILED"):
            findings.append(_retry(ledger, outbox, record.ticket, record.attempts, run_id, state, message,
                                   reschedule, max_attempts))
        elif state == "MISSING":
            ledger.resubmit(job_id)
            findings.append(Finding("run_missing", job_id, stem, f"flow run {run_id} is gone", "resubmitted"))
    findings += _half_published(outbox)
    for finding in findings:
        log.warning("reconcile.finding", kind=finding.kind, job_id=finding.job_id, input_key=finding.stem,
                    detail=finding.detail, action=finding.action)
    return findings


def _retry(ledger: Ledger, outbox: Store, ticket: JobTicket, attempts: int, run_id: str, state: str, message: str,
           reschedule: Callable[[str, str], None], max_attempts: int) -> Finding:
    job_id, stem = ticket.job_id, ticket.stem
    detail = f"flow run {run_id} {state.lower()}: {message[:300]}"
    if attempts >= max_attempts:
        try:
            _report_gave_up(outbox, ticket, attempts, detail)
        except StoreError as exc:  # the outbox itself may be what failed: keep the job, write it next pass
            return Finding("run_gave_up", job_id, stem, detail, f"error file not written yet ({exc}); next pass")
        ledger.mark_finished(job_id, ok=False, error=detail)
        return Finding("run_gave_up", job_id, stem, detail, f"marked failed after {attempts} attempts")
    reschedule(run_id, f"rescheduled by the i2vflow reconciler after: {message[:200]}")
    ledger.count_attempt(job_id)
    return Finding("run_rescheduled", job_id, stem, detail, "rescheduled")


def _report_gave_up(outbox: Store, ticket: JobTicket, attempts: int, detail: str) -> None:
    """The user's side of giving up: an error file, as for bad input, so no job ends in silence."""
    report = ErrorReport(
        error="service_failed",
        message=f"The service could not finish this job after {attempts} attempts; your input looks fine. "
        f"Last failure: {detail}",
        inputs={"image": ticket.image_key, "spec": ticket.spec_key}, job_id=ticket.job_id,
        retry=f"Ask the operator to check the service (`i2vflow doctor`, the reconciler's findings); once it is "
        f"healthy they can render this job again with `i2vflow retry {ticket.stem}` (or `--all`), or you can "
        "change its JSON (any edit, e.g. add a seed), which makes it a new job.")
    outbox.write(ticket.output_key(".error.json"), error_file_bytes(report), "application/json")


def _half_published(outbox: Store) -> list[Finding]:
    keys = {info.key for info in outbox.list()}
    return [Finding("video_without_sidecar", None, key.removesuffix(".mp4"), key,
                    "reported; a retry of its run rewrites it")
            for key in sorted(keys) if key.endswith(".mp4") and key.removesuffix(".mp4") + ".json" not in keys]


def findings_markdown(findings: list[Finding]) -> str:
    rows = "\n".join(f"| {f.kind} | {f.stem} | {f.detail} | {f.action} |" for f in findings)
    return f"# Reconciler findings\n\n| kind | input | detail | action |\n| --- | --- | --- | --- |\n{rows}\n"
