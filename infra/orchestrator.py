"""The watcher's line to the Prefect server: create flow runs and emit events.

Why creating runs of the deployment with an idempotency key (and not an event trigger): the watcher needs the
flow-run id back to record it in the ledger, it must fail loudly when the deployment is
missing, and the idempotency key (the job id) makes a second submission of the same job,
from a restarted or a second watcher, return the existing run instead of creating another.
Events are still emitted, so automations can react to jobs and videos.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any
from uuid import UUID

import structlog
from prefect.events import emit_event

from infra.jobs import JobTicket, RenderHandover


class RunSubmitter:
    """Creates runs of one deployment over one kept-open API client.

    Same call as ``run_deployment(..., timeout=0, idempotency_key=...)``, which opens a client and
    reads the deployment on every call; a watcher facing a flood submits many runs a second. On
    any error the client is dropped, so a restarted server or a re-created deployment is found
    again on the next call.
    """

    def __init__(self, deployment: str) -> None:
        self.deployment = deployment
        self._client: Any = None
        self._deployment_id: UUID | None = None

    def submit(self, ticket: JobTicket, source_kind: str, model: str,
               handover: RenderHandover | None = None) -> tuple[str, str | None]:
        """Create (or, for a known job id, find) the job's flow run. Returns its id and the id of
        the handed-over render it awaits: for a run that existed already, the one it was created
        with (a render keyed by the job, so the same one; or none)."""
        parameters: dict[str, Any] = {"ticket": ticket.model_dump(mode="json")}
        if handover is not None:
            parameters["handover"] = handover.model_dump(mode="json")
        try:
            client = self.client()
            if self._deployment_id is None:
                self._deployment_id = client.read_deployment_by_name(self.deployment).id
            flow_run = client.create_flow_run_from_deployment(
                self._deployment_id,
                parameters=parameters,
                name=ticket.run_name,
                tags=[f"source:{source_kind}", f"model:{model}"],
                idempotency_key=ticket.job_id,
            )
        except Exception:
            self.close()
            raise
        awaited = (flow_run.parameters.get("handover") or {}).get("task_run_id")
        return str(flow_run.id), awaited

    def client(self) -> Any:
        """The kept-open sync API client, opened at first use. The watcher's render hand-over
        uses it too: a client of its own per hand-over cost ~18 ms (an SSL context, a
        connection, a CSRF token) before the render could be queued."""
        if self._client is None:
            from prefect import get_client

            self._client = get_client(sync_client=True).__enter__()
        return self._client

    def close(self) -> None:
        if self._client is not None:
            client, self._client, self._deployment_id = self._client, None, None
            with contextlib.suppress(Exception):
                client.__exit__(None, None, None)


def emit_job_event(event: str, ticket: JobTicket, **payload: Any) -> None:
    """Emit ``i2vflow.<event>`` about a job, with the job as the event's resource."""
    emit_event(
        event=f"i2vflow.{event}",
        resource={
            "prefect.resource.id": f"i2vflow.job.{ticket.job_id}",
            "prefect.resource.name": ticket.stem,
            "i2vflow.inbox": ticket.inbox,
        },
        payload={"stem": ticket.stem, "job_id": ticket.job_id, **payload},
    )


def read_run_states(flow_run_ids: list[str]) -> dict[str, tuple[str, str]]:
    """State type and message of each flow run that still exists on the server."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    found: dict[str, tuple[str, str]] = {}
    with get_client(sync_client=True) as client:
        for start in range(0, len(flow_run_ids), 200):
            chunk = [UUID(i) for i in flow_run_ids[start:start + 200]]
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk)), limit=200)
            for run in runs:
                state = run.state
                found[str(run.id)] = (state.type.value if state else "UNKNOWN", (state.message or "") if state else "")
    return found


def wait_for_task_run_start(client: Any, task_run_id: str, limit: float, unclaimed_after: float = 0.15,
                            every: float = 0.015) -> str:
    """Wait, at most ``limit`` seconds, until a deferred task run has started (left Scheduled and
    Pending); return the last state type seen. Gives up at once where it ended, and after
    ``unclaimed_after`` seconds where no task worker has taken it (still Scheduled: all busy).
    Reads only: a read does not queue behind the server's writers."""
    started = time.monotonic()
    while True:
        state = client.read_task_run(UUID(task_run_id)).state
        state_type = state.type.value if state is not None else "UNKNOWN"
        waited = time.monotonic() - started
        patience = unclaimed_after if state_type == "SCHEDULED" else limit
        if state_type not in ("SCHEDULED", "PENDING") or waited >= min(patience, limit):
            return state_type
        time.sleep(every)


def cancel_task_run(task_run_id: str, reason: str) -> None:
    """Mark a handed-over render that no flow will await as Cancelled (the flow validated the job
    differently or found its input changed, or the job's run came from a watcher that hands
    nothing over). Best effort: a GPU worker that already holds it may still render it; no video
    is made from it, and a failure to cancel is logged, not raised (it wastes GPU time, nothing else)."""
    from prefect import get_client
    from prefect.states import Cancelled

    try:
        with get_client(sync_client=True) as client:
            client.set_task_run_state(UUID(task_run_id), Cancelled(message=reason), force=True)
    except Exception as exc:
        structlog.get_logger("i2vflow.orchestrator").warning("render.cancel_failed", task_run_id=task_run_id,
                                                              error=repr(exc)[:500])


def reschedule_run(flow_run_id: str, reason: str) -> None:
    """Put a crashed or failed run back in the queue: Prefect's own "retry" of a flow run."""
    from prefect import get_client
    from prefect.states import Scheduled

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Scheduled(message=reason), force=True)
