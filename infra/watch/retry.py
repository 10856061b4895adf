"""Render again the jobs the service gave up on, once the operator has fixed the cause.

Why: the reconciler reschedules a crashed or operationally failed run at most
``I2VFLOW_MAX_RESCHEDULES`` times, then records the job as failed and writes ``service_failed``
beside where its video would have gone. After the outage (a GPU host down for the night, a full
disk, a model folder not yet synced) those jobs should still become videos beside their inputs,
without every user having to edit a JSON. A retry puts the job's own flow run back in the queue
(Prefect's "retry" of a run: the same run, so still exactly once), gives the job a fresh set of
attempts and leaves the rest to the watcher's reconciler; the video's publish removes the
``service_failed`` report. Jobs that failed because of their input are refused: only a fixed
drop can help those.

    i2vflow retry --all          # every job the service gave up on
    i2vflow retry shoes/red mug  # these inputs (their stems), if the service gave up on them
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from infra.ledger import Ledger
from infra.watch.reconcile import is_final_for_user


@dataclass(frozen=True)
class RetryOutcome:
    stem: str
    action: str  # "rescheduled", "resubmitted", "refused" (a named job) or "skipped" (under --all)
    detail: str


def retry_failed(ledger: Ledger, stems: list[str] | None,
                 read_states: Callable[[list[str]], dict[str, tuple[str, str]]],
                 reschedule: Callable[[str, str], None]) -> list[RetryOutcome]:
    """1. the ledger's failed jobs (all, or those whose stem is named), 2. their runs' states on
    the server, 3. reschedule the runs the service failed; refuse the rest, saying why."""
    failed = {record.ticket.stem: record for record in ledger.in_state("failed")}
    named = list(dict.fromkeys(stems)) if stems else sorted(failed)
    outcomes = [_not_failed(ledger, stem) for stem in named if stem not in failed]
    records = [failed[stem] for stem in named if stem in failed]
    states = read_states([r.flow_run_id for r in records if r.flow_run_id]) if records else {}
    for record in records:
        state, message = states.get(record.flow_run_id or "", ("MISSING", ""))
        outcome = _retry_one(ledger, record.ticket.stem, record.ticket.job_id, record.flow_run_id, state, message,
                             reschedule)
        # Under --all, a job that failed because of its input is expected, not an error of the command.
        outcomes.append(outcome if stems or outcome.action != "refused" else replace(outcome, action="skipped"))
    return outcomes


def _not_failed(ledger: Ledger, stem: str) -> RetryOutcome:
    states = ledger.states_of(stem)
    if not states:
        return RetryOutcome(stem, "refused", "no job of that name in this watcher's ledger")
    return RetryOutcome(stem, "refused", f"its job is {states[0]}, not failed (the reconciler judges a finished "
                        "run within I2VFLOW_RECONCILE_SECONDS)")


def _retry_one(ledger: Ledger, stem: str, job_id: str, run_id: str | None, state: str, message: str,
               reschedule: Callable[[str, str], None]) -> RetryOutcome:
    if state == "MISSING" or run_id is None:
        ledger.resubmit(job_id)  # the watcher creates a new run for it (the idempotency key is free)
        return RetryOutcome(stem, "resubmitted", "its flow run is gone from the server; the watcher submits it anew")
    if is_final_for_user(state, message):
        if state == "CANCELLED":
            return RetryOutcome(stem, "refused", f"its run was cancelled ({message[:200] or 'no reason given'}); "
                                "to render it anyway, change its JSON (any edit makes a new job)")
        return RetryOutcome(stem, "refused", f"it failed because of its input ({message[:200]}); fix the input "
                            "and drop it again")
    if state not in ("CRASHED", "FAILED"):
        return RetryOutcome(stem, "refused", f"its flow run is {state.lower()}, not failed")
    reschedule(run_id, "rescheduled by `i2vflow retry` after the service gave up on it")
    ledger.retry(job_id)
    return RetryOutcome(stem, "rescheduled", f"flow run {run_id}")
