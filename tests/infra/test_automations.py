"""The zombie-run automation: applied idempotently to the real session server."""

from __future__ import annotations

from datetime import timedelta

import pytest

from infra.automations import NAME, ensure_zombie_automation, zombie_automation


def _automations() -> list:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_automations_by_name(NAME)


def test_applying_again_updates_the_one_automation_in_place(prefect_api: str) -> None:
    before = _automations()
    ensure_zombie_automation(prefect_api, 61)
    try:
        ensure_zombie_automation(prefect_api, 75)
        found = _automations()
        assert len(found) == 1 and found[0].trigger.within == timedelta(seconds=75)
        assert found[0].actions[0].state.value == "CRASHED" and not found[0].actions[0].force
    finally:  # the session's service fixture may have applied its own threshold
        if before:
            ensure_zombie_automation(prefect_api, before[0].trigger.within.total_seconds())


def test_a_threshold_within_the_heartbeat_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="must exceed the 30 s heartbeat"):
        zombie_automation(30)


def test_every_deployment_carries_the_heartbeat_the_automation_relies_on(service: object) -> None:
    """Workers started by hand (no i2vflow environment) must still send heartbeats, or the
    automation would crash live runs: prefect.yaml sets it in the deployments' job variables."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        for name in ("generate-video/generate-video", "campaign/campaign"):
            deployment = client.read_deployment_by_name(name)
            assert deployment.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30", name
            assert "i2vflow" in deployment.tags  # the tag the automation watches
