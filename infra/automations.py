"""Prefect automations i2vflow relies on, created idempotently where the deployments are applied.

Why an automation: a flow run whose process dies without a word (its host lost, its process
worker killed with SIGKILL together with the runs it started) reports nothing; Prefect leaves it
Running forever and nothing retries it. Every flow run emits ``prefect.flow-run.heartbeat`` events
(every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds, 30 at least); this automation, Prefect's own
zombie-run recipe (docs.prefect.io/v3/advanced/detect-zombie-flows), marks a run Crashed when
neither a heartbeat nor a new state arrived for ``stale_after`` seconds. The watcher's reconciler
then reschedules the crashed run (the same flow run, so still one run per job).
"""

from __future__ import annotations

from datetime import timedelta

from prefect import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.settings import PREFECT_API_URL, temporary_settings

NAME = "i2vflow: crash flow runs that stopped sending heartbeats"
HEARTBEAT_FLOOR = 30  # Prefect 3.9 never sends flow-run heartbeats more often (flow_engine.py)
# Pending and Running open the window as heartbeats do: a worker killed between handing a run to
# its process and that process starting leaves a run Pending with no heartbeat ever sent.
_ALIVE = {"prefect.flow-run.Pending", "prefect.flow-run.Running", "prefect.flow-run.heartbeat"}
_ENDED = {"prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
          "prefect.flow-run.Crashed"}


def zombie_automation(stale_after: float, tag: str = "i2vflow") -> AutomationCore:
    """The automation for runs tagged ``tag`` (the deployments' tag in prefect.yaml).

    Only i2vflow's runs: other runs on a shared server may heartbeat at Prefect's default 180 s,
    which a shorter ``stale_after`` would misread as dead.
    """
    if stale_after <= HEARTBEAT_FLOOR:
        raise ValueError(f"stale_after ({stale_after} s) must exceed the {HEARTBEAT_FLOOR} s heartbeat")
    return AutomationCore(
        name=NAME,
        description=f"Marks an i2vflow flow run Crashed after {stale_after:g} s without a heartbeat or a "
        "state change (its process or host died); the watcher's reconciler reschedules it.",
        trigger=EventTrigger(
            after=_ALIVE,
            expect=_ALIVE | _ENDED,
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification({"prefect.resource.role": "tag",
                                                 "prefect.resource.id": f"prefect.tag.{tag}"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=stale_after),
        ),
        # Not forced: a run that finished meanwhile keeps its final state.
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {stale_after:g} s: its process or host died")],
    )


def ensure_zombie_automation(api_url: str, stale_after: float) -> None:
    """Create the automation, or update it in place (one per server, found by name)."""
    wanted = zombie_automation(stale_after)
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(NAME)
        if not existing:
            client.create_automation(wanted)
            return
        client.update_automation(existing[0].id, wanted)
        for duplicate in existing[1:]:  # two hosts applying at once may both have created one
            client.delete_automation(duplicate.id)


if __name__ == "__main__":  # on a fleet: once, beside `prefect deploy --all`
    from infra.settings import get_settings

    if not PREFECT_API_URL.value():
        raise SystemExit("set PREFECT_API_URL to the Prefect server's API (e.g. http://prefect:4200/api)")
    ensure_zombie_automation(str(PREFECT_API_URL.value()), get_settings().zombie_after_seconds)
