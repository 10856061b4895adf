"""The watcher: list the inbox, settle, pair, record in the ledger, create flow runs.

Why this shape: hints (watchdog events, bucket notifications) only decide *when* to look;
every look lists the store, and only settled, paired files become jobs. The ledger makes the
hand-off to Prefect exactly-once across restarts, duplicate events and several watchers.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import structlog

from infra import metrics
from infra.jobs import JobTicket, is_ignored, make_job_id, resolve_reference
from infra.ledger import Ledger
from infra.settings import Settings
from infra.store.base import ObjectInfo, Store, StoreError, UnsafeKeyError
from infra.watch.scanner import Candidate, Settler, pair

# Files copied together (an image and its spec) land within BURST_SECONDS of the first event;
# a look waits until hints have been quiet for QUIET_SECONDS, and no longer than the burst.
BURST_SECONDS = 0.1
QUIET_SECONDS = 0.02

log = structlog.get_logger("i2vflow.watcher")

Submit = Callable[[JobTicket, str], str]  # (ticket, model) -> flow run id
Notify = Callable[[str, JobTicket], None]  # (event name, ticket)


@dataclass
class ScanReport:
    listed: int = 0
    new_jobs: int = 0
    submitted: int = 0
    submit_errors: int = 0


class Watcher:
    """One inbox, one ledger, one way to submit. Run ``run()`` in a thread or a process."""

    def __init__(self, settings: Settings, inbox: Store, inbox_location: str,
                 outbox_location: str, ledger: Ledger, submit: Submit, notify: Notify,
                 source_kind: str = "folder") -> None:
        self.settings = settings
        self.inbox = inbox
        self.inbox_location = inbox_location
        self.outbox_location = outbox_location
        self.ledger = ledger
        self.submit = submit
        self.notify = notify
        self.source_kind = source_kind
        self.route = f"{inbox_location} -> {outbox_location}"
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.settler = Settler(settings.settle_seconds)
        self.wake = threading.Event()
        self._models: dict[str, str] = {}
        self._backoff = 0.0
        # Candidates (exact object versions) already recorded in the ledger, so a rescan of a
        # large inbox lists and pairs but reads and hashes only what changed.
        self._recorded: dict[tuple[ObjectInfo, ...], str] = {}
        # Set by build_watcher: compares ledger, Prefect runs and outbox (infra/watch/reconcile.py).
        self.reconcile: Callable[[], object] | None = None
        self.hint_sources: list[object] = []  # what wakes this watcher early (for tests and doctor)
        # Set by build_watcher: a cheap "is the Prefect server answering?" probe, so a back-off
        # after failed submits ends as soon as the server is back, not up to a minute later.
        self.server_back: Callable[[], bool] | None = None
        self._next_reconcile = 0.0
        self.scans = 0  # completed looks: "nothing was submitted" means something only after some

    def scan_once(self) -> ScanReport:
        """One look at the inbox: 1. list, 2. settle, 3. pair, 4. record, 5. submit."""
        report = ScanReport()
        listing = [info for info in self.inbox.list() if not is_ignored(info.key)]
        report.listed = len(listing)
        settled = self.settler.observe(listing)
        settled_for = {key: self.settler.settled_for(key) for key in settled}
        grace = max(self.settings.settle_seconds * 2, 1.0)
        seen: dict[tuple[ObjectInfo, ...], str] = {}
        for candidate in pair(settled, self.settler.unsettled(), settled_for, grace, self.settings.orphan_seconds):
            if candidate.objects in self._recorded:  # unchanged since recorded: no re-reading
                seen[candidate.objects] = self._recorded[candidate.objects]
                continue
            ticket = self._safe_ticket(candidate, settled)
            if ticket is not None and candidate.image_key is not None:
                seen[candidate.objects] = ticket.job_id
            if ticket is not None and self.ledger.record_detected(ticket):
                report.new_jobs += 1
                log.info("job.detected", job_id=ticket.job_id, input_key=ticket.stem,
                         image_key=ticket.image_key, spec_key=ticket.spec_key)
                self._safe_notify("job.detected", ticket)
        self._recorded = seen  # only what is still there: memory follows the inbox
        self._submit_pending(report)
        metrics.observe_scan(report, self.ledger.counts)
        self.scans += 1
        return report

    def vouch(self, key: str) -> None:
        """A hint source's word that ``key``'s writer is done (a folder's close event, a bucket's
        object-created event): the version it has now needs no second look. Called from the
        hint thread; never raises."""
        if is_ignored(key):
            return
        try:
            info = self.inbox.stat(key)
        except (OSError, StoreError, UnsafeKeyError):
            return  # gone, or refused: the listing decides
        if info is not None:
            self.settler.vouch(info)

    def _safe_ticket(self, candidate: Candidate, settled: dict[str, ObjectInfo]) -> JobTicket | None:
        """A ticket, a refused ticket (unsafe name or link), or None; one bad file never
        stops the scan of the others."""
        if any(ord(c) < 32 or ord(c) == 127 for c in candidate.stem):
            return self._refused(candidate, "the name contains control characters; rename the files")
        if candidate.missing == "spec":
            return self._orphan(candidate, "spec", candidate.image_key)
        try:
            return self._ticket(candidate, settled)
        except UnsafeKeyError as exc:
            return self._refused(candidate, f"{exc}; drop a regular file instead of a link out of the inbox")
        except (FileNotFoundError, StoreError) as exc:
            log.info("candidate.skipped", input_key=candidate.stem, reason=repr(exc)[:300])
            return None

    def _refused(self, candidate: Candidate, why: str) -> JobTicket:
        printable = "".join(c for c in candidate.stem if ord(c) >= 32 and ord(c) != 127) or "unnamed"
        return JobTicket(
            job_id=make_job_id(self.route, candidate.stem, None, None, [("refused", _versions(candidate))]),
            # The error report's name: control characters neither travel through Prefect nor display.
            stem=printable, inbox=self.inbox_location, outbox=self.outbox_location,
            image_key=candidate.image_key, spec_key=candidate.spec_key,
            defaults_keys=candidate.defaults_keys, image_ref_error=why,
        )

    def _orphan(self, candidate: Candidate, missing: Literal["spec", "image"], image_key: str | None) -> JobTicket:
        """A ticket whose run only reports what is missing (its own job: the finished pair is another)."""
        return JobTicket(
            job_id=make_job_id(self.route, candidate.stem, None, None, [(f"missing {missing}", _versions(candidate))]),
            stem=candidate.stem, inbox=self.inbox_location, outbox=self.outbox_location, image_key=image_key,
            spec_key=candidate.spec_key, defaults_keys=candidate.defaults_keys, missing=missing,
        )

    def _waiting_for_image(self, candidate: Candidate, image_key: str | None) -> JobTicket | None:
        """None while a JSON's image may still come; past the orphan time, the report of its absence."""
        orphan_after = self.settings.orphan_seconds
        if orphan_after and self.settler.settled_for(candidate.spec_key or "") >= orphan_after:
            return self._orphan(candidate, "image", image_key)
        return None

    def _ticket(self, candidate: Candidate, settled: dict[str, ObjectInfo]) -> JobTicket | None:
        """Hash the candidate's files into a ticket; None while a referenced image is absent."""
        spec_raw = self._read_small(candidate.spec_key) if candidate.spec_key else None
        peek = _peek(spec_raw)
        image_key, ref_error = candidate.image_key, None
        if image_key is None:
            reference = peek.get("image")
            if not isinstance(reference, str):
                return self._waiting_for_image(candidate, None)
            image_key = resolve_reference(candidate.spec_key or "", reference)
            if image_key is None:
                ref_error = f"'image' reference {reference!r} escapes the inbox"
            elif image_key not in settled:
                return self._waiting_for_image(candidate, image_key)
        image_sha = self._hash(settled[image_key]) if image_key else None
        spec_sha = hashlib.sha256(spec_raw).hexdigest() if spec_raw is not None else None
        defaults = [(key, self._hash(settled[key])) for key in candidate.defaults_keys]
        ticket = JobTicket(
            job_id=make_job_id(self.route, candidate.stem, image_sha, spec_sha, defaults),
            stem=candidate.stem, inbox=self.inbox_location, outbox=self.outbox_location,
            image_key=image_key, spec_key=candidate.spec_key,
            defaults_keys=candidate.defaults_keys, image_sha256=image_sha,
            spec_sha256=spec_sha, image_ref_error=ref_error,
        )
        model = peek.get("model")
        self._models[ticket.job_id] = model if isinstance(model, str) else self.settings.model
        return ticket

    def _read_small(self, key: str) -> bytes:
        info = self.inbox.stat(key)
        if info is None or info.size > self.settings.max_spec_bytes:
            return f"<{key} missing or over {self.settings.max_spec_bytes} bytes>".encode()
        return self.inbox.read(key)

    def _hash(self, info: ObjectInfo) -> str:
        cached = self.ledger.cached_hash(self.inbox_location, info.key, info.size, info.version)
        if cached:
            return cached
        digest = hashlib.sha256()
        with self.inbox.open(info.key) as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        sha = digest.hexdigest()
        self.ledger.remember_hash(self.inbox_location, info.key, info.size, info.version, sha)
        return sha

    def _submit_pending(self, report: ScanReport) -> None:
        for job_id in self.ledger.claimable():
            if not self.ledger.claim(job_id, self.owner, self.settings.submit_lease_seconds):
                continue  # another watcher holds it
            record = self.ledger.get(job_id)
            assert record is not None
            model = self._models.get(job_id, self.settings.model)
            try:
                flow_run_id = self.submit(record.ticket, model)
            except Exception as exc:  # the server may be down: keep the job, retry later
                self.ledger.release(job_id, self.owner, repr(exc))
                report.submit_errors += 1
                log.warning("run.submit_failed", job_id=job_id, input_key=record.ticket.stem,
                            error=repr(exc)[:500])
                break  # back off: the next scan tries again
            self.ledger.mark_submitted(job_id, flow_run_id)
            report.submitted += 1
            log.info("run.created", job_id=job_id, input_key=record.ticket.stem,
                     flow_run_id=flow_run_id)

    def _safe_notify(self, event: str, ticket: JobTicket) -> None:
        try:
            self.notify(event, ticket)
        except Exception as exc:  # events are best effort; the run is what matters
            log.warning("event.emit_failed", event=event, job_id=ticket.job_id, error=repr(exc))

    def run(self, stop: threading.Event) -> None:
        """Scan until ``stop`` is set: at once on a hint, else every ``rescan_seconds``.
        Store or server failures back off exponentially (up to a minute), never crash."""
        last_hinted_look, hinted = float("-inf"), False
        while not stop.is_set():
            probe = None
            try:
                report = self.scan_once()
                self._backoff = 0.0 if not report.submit_errors else self._next_backoff()
                probe = self.server_back
            except Exception as exc:
                self._backoff = self._next_backoff()
                log.error("scan.failed", error=repr(exc)[:500], retry_in=self._backoff)
            if hinted:
                # Settling is measured from when a look saw the files (after its listing), so the
                # next hinted look is due a full settle period after that, not after this look
                # began: a look scheduled on its start could see the files settled 1 ms short of
                # the period and leave the job for one more period.
                last_hinted_look, hinted = self.settler.last_look, False
            if self._backoff:
                self._back_off(stop, probe)  # hints must not cut a back-off short
                continue
            self._maybe_reconcile()
            pending_settle = bool(self.settler.unsettled())
            wait = self.settings.settle_seconds if pending_settle else self.settings.rescan_seconds
            woke = self.wake.wait(timeout=max(wait, 0.05))
            if woke:
                # A hint after a quiet spell is looked at almost at once (that look starts the
                # settle clock), once the hints have gone quiet, so that an image and its spec
                # copied together are both in it. During a burst of events, one hinted look per
                # settle_seconds.
                self._wait_for_quiet(stop)
                next_look = last_hinted_look + self.settings.settle_seconds
                stop.wait(max(0.0, next_look - time.monotonic()))
                hinted = True

    def _wait_for_quiet(self, stop: threading.Event) -> None:
        """Return once no hint came for QUIET_SECONDS, or BURST_SECONDS after this was called.
        Writing a pair gives a few events within a millisecond or two (created, modified, closed
        for each file); a fixed wait of a whole burst was 0.1 s of every lone job's latency."""
        deadline = time.monotonic() + BURST_SECONDS
        self.wake.clear()
        while (left := deadline - time.monotonic()) > 0 and not stop.is_set():
            if not self.wake.wait(min(QUIET_SECONDS, left)):
                return
            self.wake.clear()

    def _maybe_reconcile(self) -> None:
        if self.reconcile is None or time.monotonic() < self._next_reconcile:
            return
        self._next_reconcile = time.monotonic() + self.settings.reconcile_seconds
        try:
            self.reconcile()
        except Exception as exc:  # the server may be away; the next pass tries again
            log.warning("reconcile.failed", error=repr(exc)[:500])

    def _back_off(self, stop: threading.Event, server_back: Callable[[], bool] | None) -> None:
        """Wait out the back-off; after failed submits, end it early once a server that was seen
        down answers again (a healthy server that refuses submits keeps the full back-off)."""
        deadline = time.monotonic() + self._backoff
        seen_down = server_back is not None and not server_back()
        while (left := deadline - time.monotonic()) > 0:
            if stop.wait(min(left, 2.0)):
                return
            if server_back is not None:
                healthy = server_back()
                if healthy and seen_down:
                    return
                seen_down = seen_down or not healthy

    def _next_backoff(self) -> float:
        return min(60.0, max(1.0, self._backoff * 2))


def _versions(candidate: Candidate) -> str:
    """The exact object versions of a job unread: a refusal or an orphan report is about these."""
    return "|".join(f"{o.key}:{o.size}:{o.version}" for o in candidate.objects)


def _peek(raw: bytes | None) -> dict[str, object]:
    """Best-effort parse of a spec for routing hints; validation happens in the flow."""
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}
