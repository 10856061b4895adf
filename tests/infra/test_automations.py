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
