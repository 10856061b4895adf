"""Flow: a campaign re-renders a selection of the inbox, with variants, into a dated slot.

Why this shape: each item goes through the same tasks as a live drop (load-inputs with the
campaign's overrides, render-video on the warm GPU task worker under the same ``gpu`` limit,
publish-video), so retries, sidecars and error reports are the same. Live drops keep
flowing because the campaign keeps at most ``in_flight`` renders queued at the GPU worker (1 for
``priority: low``): a live drop's render waits behind at most that many campaign renders. Items
whose sidecar already exists in the slot are skipped, so a rerun or a resume renders only what
is missing, and next week's run writes into its own dated prefix.

Steps: 1. read and validate the spec, 2. plan, 3. render the missing items, K at a time,
4. report (progress and table artifacts, contact sheet, campaign.json, events).
"""

from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from prefect import flow, runtime, tags
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.events import emit_event
from prefect.futures import PrefectFuture
from prefect.states import Completed, Failed, State

from infra.campaign import (
    CampaignSpec,
    CampaignSpecError,
    Plan,
    PlanItem,
    item_ticket,
    load_campaign_spec,
    read_campaign_spec,
)
from infra.jobs import JobTicket
from infra.logging import configure_logging
from infra.settings import get_settings
from infra.spec import BadInputError
from infra.store import open_store
from tasks.campaign import contact_sheet, local_path, plan, write_report
from tasks.inputs import InputChangedError, PreparedJob, load_inputs
from tasks.publish import build_sidecar, publish_video, write_error_report
from tasks.render import await_render, render_failure_report, render_video

log = structlog.get_logger("i2vflow.campaign")


@dataclass
class _InFlight:
    item: PlanItem
    ticket: JobTicket
    job: PreparedJob
    future: PrefectFuture[Any]
    started: float
    timings: dict[str, float] = field(default_factory=dict)


@flow(name="campaign", log_prints=False, retries=0)
def run_campaign(
    spec_path: str | None = None,
    spec: dict[str, Any] | None = None,
    run_date: str | None = None,
    inbox: str | None = None,
    outbox: str | None = None,
    max_items: int | None = None,
) -> State:
    """Render the campaign's missing items of this slot. ``spec_path`` (a file in the repo, or
    ``s3://...``) or ``spec`` (the parsed mapping); ``run_date`` defaults to the scheduled day in
    the campaign's time zone; ``max_items`` renders at most that many this run (the rest stays
    for the next run of the same slot)."""
    settings = get_settings()
    configure_logging(settings.resolved_log_file)
    inbox = _absolute(inbox or settings.inbox)
    outbox = _absolute(outbox or settings.outbox)
    # 1. Spec: refused precisely, before anything renders.
    try:
        campaign = _read_spec(spec_path, spec)
    except CampaignSpecError as exc:
        create_markdown_artifact(
            key="campaign-spec-error",
            markdown=f"# Campaign spec refused\n\n```\n{exc}\n```",
            description="why the campaign did not start",
        )
        return Failed(message=str(exc))
    slot = run_date or campaign.run_date(_scheduled_start())
    # 2. Plan.
    the_plan = plan(campaign, slot, inbox, outbox)
    todo = the_plan.todo[:max_items] if max_items is not None else the_plan.todo
    key = _artifact_key(campaign.name)
    create_markdown_artifact(
        key=f"{key}-plan",
        markdown=f"# Plan\n\n```\n{the_plan.describe()}\n```",
        description=f"campaign {campaign.name}, slot {slot}",
    )
    _emit(
        "started",
        campaign,
        slot,
        items=len(the_plan.items),
        todo=len(todo),
        prefix=the_plan.prefix,
        estimate_seconds=the_plan.estimate_seconds,
    )
    log.info("campaign.started", campaign=campaign.name, slot=slot, items=len(the_plan.items), todo=len(todo))
    # 3. Render, at most `in_flight` queued at the GPU worker.
    results, wall = _render(the_plan, todo, campaign, slot, inbox, outbox, key)
    # 4. Report.
    summary = _report(the_plan, results, campaign, slot, outbox, key, wall)
    counts = summary["counts"]
    _emit("finished", campaign, slot, counts=counts, seconds=wall, contact_sheet=summary["contact_sheet"])
    log.info("campaign.finished", campaign=campaign.name, slot=slot, counts=counts, seconds=wall)
    message = f"{campaign.name} {slot}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return Failed(message=message, data=summary) if counts.get("failed") else Completed(message=message, data=summary)


def _render(the_plan: Plan, todo: list[PlanItem], campaign: CampaignSpec, slot: str, inbox: str, outbox: str,
            key: str) -> tuple[dict[str, dict[str, Any]], float]:
    """Each item of ``todo`` through load-inputs, render, publish, with at most ``in_flight``
    renders queued at the GPU worker; a row per item of the plan, and the wall time."""
    settings = get_settings()
    started = time.perf_counter()
    progress_id = create_progress_artifact(
        progress=_percent(0, len(todo)),
        key=f"{key}-progress",
        description=f"{campaign.name} {slot}: items of this run",
    )
    results: dict[str, dict[str, Any]] = {
        i.output_stem: _row(i, "done earlier", None) for i in the_plan.items if i.done
    }
    window: deque[_InFlight] = deque()
    hashes: dict[str, str] = {}
    inbox_store = open_store(inbox, settings)
    finished = 0

    def done(item: PlanItem, row: dict[str, Any]) -> None:
        nonlocal finished
        results[item.output_stem] = row
        finished += 1
        update_progress_artifact(progress_id, _percent(finished, len(todo)))

    for item in todo:
        while len(window) >= campaign.in_flight:
            oldest = window.popleft()
            done(oldest.item, _finish(oldest, campaign, slot, settings.render_timeout_seconds))
        entry = _start(item, campaign, slot, inbox_store, inbox, outbox, hashes)
        if isinstance(entry, dict):
            done(item, entry)
        else:
            window.append(entry)
    while window:
        oldest = window.popleft()
        done(oldest.item, _finish(oldest, campaign, slot, settings.render_timeout_seconds))
    return results, round(time.perf_counter() - started, 2)


def _report(the_plan: Plan, results: dict[str, dict[str, Any]], campaign: CampaignSpec, slot: str,
            outbox: str, key: str, wall: float) -> dict[str, Any]:
    """campaign.json, the contact sheet and the run's artifacts; returns the summary."""
    rows = [results.get(i.output_stem) or _row(i, "not this run", None) for i in the_plan.items]
    sheet = contact_sheet(
        outbox,
        the_plan.prefix,
        [
            (f"{r['input']} [{r['variant']}]", r["video_key"])
            for r in rows
            if r["status"] in ("rendered", "done earlier")
        ],
    )
    counts = {status: sum(r["status"] == status for r in rows) for status in {r["status"] for r in rows}}
    summary = {
        "campaign": campaign.name,
        "run_date": slot,
        "prefix": the_plan.prefix,
        "counts": counts,
        "rendered_this_run": counts.get("rendered", 0),
        "seconds": wall,
        "contact_sheet": sheet,
        "flow_run_id": str(runtime.flow_run.id or ""),
        "finished_at": datetime.now(UTC).isoformat(),
        "items": rows,
    }
    write_report(outbox, the_plan.prefix, summary)
    create_table_artifact(
        key=f"{key}-items",
        description=f"{campaign.name} {slot}",
        table=[{k: r[k] for k in ("input", "variant", "status", "seconds", "output")} for r in rows],
    )
    where = local_path(outbox, sheet) if sheet else None
    create_markdown_artifact(
        key=f"{key}-summary",
        description=f"{campaign.name} {slot}",
        markdown=(
            f"# Campaign {campaign.name}, slot {slot}\n\n"
            + "\n".join(f"- {status}: {n}" for status, n in sorted(counts.items()))
            + f"\n\nOutputs under `{the_plan.prefix}` in `{outbox}`; wall time {wall} s."
            + (f"\n\nContact sheet: `{where or sheet}`" if sheet else "")
        ),
    )
    return summary


def _read_spec(spec_path: str | None, spec: dict[str, Any] | None) -> CampaignSpec:
    """``spec`` (a mapping) wins over ``spec_path``: the deployment's default path stays set."""
    if spec_path is None and spec is None:
        from infra.spec import FieldProblem

        raise CampaignSpecError(
            "parameters",
            [
                FieldProblem(
                    field="spec_path/spec",
                    problem="give one of them",
                    fix="spec_path: examples/campaigns/spring-shoes.yaml",
                )
            ],
        )
    if spec is not None:
        import json

        return load_campaign_spec(json.dumps(spec), "spec parameter")
    try:
        return read_campaign_spec(spec_path or "", lambda location: open_store(location, get_settings()))
    except OSError as exc:
        from infra.spec import FieldProblem

        raise CampaignSpecError(
            spec_path or "", [FieldProblem(field=None, problem=f"cannot read: {exc}", fix="check the path")]
        ) from None


def _start(
    item: PlanItem,
    campaign: CampaignSpec,
    slot: str,
    inbox_store: Any,
    inbox: str,
    outbox: str,
    hashes: dict[str, str],
) -> _InFlight | dict[str, Any]:
    """Load the item's inputs with its overrides and queue its render; a row if it cannot start."""
    begun = time.perf_counter()
    try:
        ticket = item_ticket(item, campaign.name, slot, inbox_store, inbox, outbox, hashes)
    except (OSError, FileNotFoundError) as exc:
        return _row(item, "skipped", begun, error=f"input vanished: {exc}")
    try:
        t0 = time.perf_counter()
        job = load_inputs(ticket, item.overrides)
        timings = {"load_inputs": round(time.perf_counter() - t0, 3)}
        with tags(f"model:{job.model}", f"campaign:{campaign.name}"):
            future = render_video.delay(job)
    except BadInputError as exc:
        write_error_report(ticket, exc.report)
        return _row(item, "failed", begun, error=exc.report.message)
    except InputChangedError as exc:
        return _row(item, "skipped", begun, error=str(exc))
    return _InFlight(item, ticket, job, future, begun, timings)


def _finish(entry: _InFlight, campaign: CampaignSpec, slot: str, timeout: float) -> dict[str, Any]:
    """Wait for the render (and its MP4), publish; a failure becomes the item's error report."""
    timings = entry.timings
    try:
        t0 = time.perf_counter()
        rendered = await_render(entry.future, timeout)
        timings["render"] = round(time.perf_counter() - t0, 3)
        timings["total_before_publish"] = round(time.perf_counter() - entry.started, 3)
        sidecar = build_sidecar(entry.ticket, entry.job, rendered, timings)
        sidecar["campaign"] = {
            "name": campaign.name,
            "run_date": slot,
            "variant": entry.item.variant,
            "overrides": entry.item.overrides,
            "input_stem": entry.item.job.stem,
        }
        sidecar = publish_video(entry.ticket, rendered.video, sidecar)
    except Exception as exc:
        log.warning("campaign.item_failed", campaign=campaign.name, item=entry.item.output_stem, error=repr(exc))
        try:
            write_error_report(entry.ticket, render_failure_report(exc))
        except Exception as report_exc:  # the row still says what happened
            log.warning("campaign.error_report_failed", error=repr(report_exc))
        return _row(entry.item, "failed", entry.started, error=f"{type(exc).__name__}: {exc}"[:500])
    row = _row(entry.item, "rendered", entry.started, url=sidecar["video"]["url"])
    row["render_on_model"] = rendered.engine.get("render_seconds")
    return row


def _row(
    item: PlanItem, status: str, begun: float | None, error: str | None = None, url: str | None = None
) -> dict[str, Any]:
    return {
        "input": item.job.image_key,
        "variant": item.variant,
        "status": status,
        "seconds": round(time.perf_counter() - begun, 2) if begun is not None else None,
        "output": url or item.video_key,
        "video_key": item.video_key,
        "error": error,
    }


def _percent(done: int, total: int) -> float:
    return 100.0 if total == 0 else round(100.0 * done / total, 1)


def _artifact_key(name: str) -> str:
    return "campaign-" + re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


def _absolute(location: str) -> str:
    from pathlib import Path

    return location if location.startswith("s3://") else str(Path(location).resolve())


def _scheduled_start() -> datetime | None:
    """When this run was meant to start (the cron slot), so a late start keeps its date."""
    try:
        when = runtime.flow_run.scheduled_start_time
    except Exception:
        return None
    return datetime.fromisoformat(str(when)) if when is not None else None


def _emit(what: str, campaign: CampaignSpec, slot: str, **payload: Any) -> None:
    try:
        emit_event(
            event=f"i2vflow.campaign.{what}",
            resource={
                "prefect.resource.id": f"i2vflow.campaign.{campaign.name}",
                "prefect.resource.name": campaign.name,
                "i2vflow.run_date": slot,
            },
            payload={"campaign": campaign.name, "run_date": slot, **payload},
        )
    except Exception as exc:  # events are best effort
        log.warning("event.emit_failed", event=what, error=repr(exc))


if __name__ == "__main__":
    run_campaign.serve(name="campaign")
