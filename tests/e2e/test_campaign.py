"""A campaign through the `campaign` deployment on the real stack, while a live drop flows."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

from infra.engine.video import probe_mp4
from tests.helpers import FAST_SPEC, drop, png_bytes, wait_for

COLORS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (40, 200, 200)]


def _flow_run(run_id: object) -> object:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def _render_spans(flow_run_id: object) -> list[tuple[float, float]]:
    """(start, end) of every render-video task run a flow run submitted, in start order."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     limit=200)
    return sorted((run.start_time.timestamp(), run.end_time.timestamp())
                  for run in runs if run.name.startswith("render-video"))


def test_live_drop_completes_while_a_40_item_campaign_runs(start_watcher, tmp_path: Path) -> None:
    """Why 40 items: the live drop must meet a campaign that is still rendering. On 2 cores and
    SQLite, creating the live drop's flow run once took 59 s (the server's "database is locked"),
    longer than a 20-item campaign's remaining ~40 s; 40 items leave ~80 s."""
    from prefect.deployments import run_deployment

    catalogue, live_inbox, outbox = tmp_path / "catalogue", tmp_path / "live", tmp_path / "outbox"
    for index in range(5):
        drop(catalogue, f"shoes/s{index}", {"prompt": f"shoe {index} turning", **FAST_SPEC},
             png_bytes(color=COLORS[index]))
    live_inbox.mkdir()
    start_watcher(live_inbox, outbox)
    spec = {"name": "weekly", "selection": {"prefix": "shoes/"}, "variants": {"grid": {"seed": list(range(1, 9))}},
            "priority": "low"}
    run = run_deployment("campaign/campaign", timeout=0, parameters={
        "spec": spec, "inbox": str(catalogue), "outbox": str(outbox), "run_date": "2026-03-02"})
    slot = outbox / "campaigns/weekly/2026-03-02"

    def first_item() -> bool:
        state = _flow_run(run.id).state
        assert not (state.is_final() and not state.is_completed()), state.message
        return bool(list(slot.glob("shoes/*.json")))

    wait_for(first_item, timeout=120, what="the campaign's first item")

    dropped = time.time()
    drop(live_inbox, "hot", {"prompt": "new arrival spinning", **FAST_SPEC}, png_bytes(color=(250, 250, 250)))
    live = wait_for(lambda: (outbox / "hot.json").exists() and json.loads((outbox / "hot.json").read_text()),
                    timeout=180, what="the live drop's sidecar")
    live_seconds = time.time() - dropped
    assert not (slot / "campaign.json").exists(), (
        f"the live drop must finish while the campaign still runs; it took {live_seconds:.1f} s, "
        f"{live['timings_seconds']['render']:.1f} s of it in its render task")

    wait_for(lambda: _flow_run(run.id).state.is_final(), timeout=300, what="the campaign run")
    state = _flow_run(run.id).state
    assert state.is_completed(), state.message
    videos = sorted(slot.glob("shoes/*.mp4"))
    assert len(videos) == 40
    assert [probe_mp4(v).frames for v in videos] == [8] * 40
    report = json.loads((slot / "campaign.json").read_text())
    assert report["counts"] == {"rendered": 40}
    assert (slot / "contact-sheet.png").stat().st_size > 0
    # Priority low: never a second campaign render at the GPU worker while one is there, so a live
    # drop queues behind at most one (with all 40 queued, the worker's two slots would overlap them).
    spans = _render_spans(run.id)
    assert len(spans) == 40
    overlaps = [(a, b) for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1]]
    assert not overlaps, f"{len(overlaps)} campaign renders started before the one before them ended"

    # Campaign renders continued after the live one: they interleaved at the GPU worker.
    live_at = datetime.fromisoformat(live["created_at"])
    later = [p for p in slot.glob("shoes/*.json")
             if datetime.fromisoformat(json.loads(p.read_text())["created_at"]) > live_at]
    assert later, "campaign items should still render after the live drop"
    queue_wait = live["timings_seconds"]["render"] - live["timings_seconds"]["render_on_model"]
    rows = report["items"]
    render = sum(r["render_on_model"] for r in rows)
    print(f"\ncampaign: {len(rows)} items in {report['seconds']:.1f} s = {60 * len(rows) / report['seconds']:.1f}"
          f" items/min; render on model {render / len(rows):.2f} s/item; orchestration overhead "
          f"{(report['seconds'] - render) / len(rows):.2f} s/item (includes the live drop's render)")
    print(f"live drop: {live_seconds:.1f} s drop-to-sidecar, {queue_wait:.2f} s waiting for the GPU; "
          f"{len(later)} campaign items rendered after it")


def test_campaign_events_are_emitted(service, tmp_path: Path) -> None:
    """started/finished events reach the server (read back through the events API)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter  # noqa: F401  (import check)
    from prefect.deployments import run_deployment
    from prefect.events.filters import EventFilter, EventNameFilter

    catalogue, outbox = tmp_path / "catalogue", tmp_path / "outbox"
    drop(catalogue, "a", {"prompt": "a", **FAST_SPEC}, png_bytes())
    run = run_deployment("campaign/campaign", timeout=120, parameters={
        "spec": {"name": "events"}, "inbox": str(catalogue), "outbox": str(outbox), "run_date": "2026-03-02"})
    assert run.state.is_completed(), run.state.message

    def names() -> set[str]:
        with get_client(sync_client=True) as client:
            response = client.request("POST", "/events/filter", json={"filter": EventFilter(
                event=EventNameFilter(prefix=["i2vflow.campaign."])).model_dump(mode="json"), "limit": 50})
            return {e["event"] for e in response.json()["events"]
                    if e["resource"]["prefect.resource.id"] == "i2vflow.campaign.events"}

    assert wait_for(lambda: names() >= {"i2vflow.campaign.started", "i2vflow.campaign.finished"}, timeout=30)
