"""The watcher's line to the Prefect server: create flow runs and emit events.

Why run_deployment with an idempotency key (and not an event trigger): the watcher needs the
flow-run id back to record it in the ledger, it must fail loudly when the deployment is
missing, and the idempotency key (the job id) makes a second submission of the same job,
from a restarted or a second watcher, return the existing run instead of creating another.
Events are still emitted, so automations can react to jobs and videos.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect.deployments import run_deployment
from prefect.events import emit_event

from infra.jobs import JobTicket


def submit_job(ticket: JobTicket, deployment: str, source_kind: str, model: str) -> str:
    """Create (or find) the generate-video flow run of this job; return its id."""
    flow_run = run_deployment(
        name=deployment,
        parameters={"ticket": ticket.model_dump(mode="json")},
        timeout=0,
        idempotency_key=ticket.job_id,
        flow_run_name=ticket.run_name,
        tags=[f"source:{source_kind}", f"model:{model}"],
    )
    return str(flow_run.id)


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


def reschedule_run(flow_run_id: str, reason: str) -> None:
    """Put a crashed or failed run back in the queue: Prefect's own "retry" of a flow run."""
    from prefect import get_client
    from prefect.states import Scheduled

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Scheduled(message=reason), force=True)
