"""Tasks of a campaign: plan it, and report on it (contact sheet, summary file).

Why tasks of their own: planning reads both stores and may take a while on a large inbox; the
contact sheet re-reads every video of the slot. Each shows in the UI with its own timing, and a
failure of the report never loses a rendered video.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import task

from infra.campaign import CONTACT_SHEET, REPORT, CampaignSpec, Plan, plan_campaign, store_modified_at, survey
from infra.settings import get_settings
from infra.store import open_store

THUMB = 96  # contact-sheet cell height in pixels
LABEL = 220  # width of the label column


@task(name="plan-campaign", retries=2, retry_delay_seconds=[2, 10])
def plan(spec: CampaignSpec, run_date: str, inbox: str, outbox: str) -> Plan:
    """Survey the inbox and the slot in the outbox, then plan (pure logic in infra.campaign)."""
    settings = get_settings()
    inbox_store, outbox_store = open_store(inbox, settings), open_store(outbox, settings)
    found = survey(spec, inbox_store, outbox_store, run_date, store_modified_at(inbox_store))
    return plan_campaign(spec, found, run_date, default_model=settings.model)


def _three_frames(video: bytes) -> list[Any]:
    """First, middle and last frame of an MP4 as PIL images."""
    import imageio_ffmpeg
    from PIL import Image

    with tempfile.NamedTemporaryFile(suffix=".mp4") as handle:
        handle.write(video)
        handle.flush()
        reader = imageio_ffmpeg.read_frames(handle.name)
        meta = next(reader)
        width, height = meta["size"]
        frames = [bytes(frame) for frame in reader]
    if not frames:
        return []
    picks = sorted({0, len(frames) // 2, len(frames) - 1})
    return [Image.frombytes("RGB", (width, height), frames[i]) for i in picks]


@task(name="contact-sheet", retries=1, retry_delay_seconds=2)
def contact_sheet(outbox: str, prefix: str, entries: list[tuple[str, str]]) -> str | None:
    """One row per item (label, first/middle/last frame), written as ``<prefix>contact-sheet.png``.
    ``entries`` are (label, video key); missing videos are skipped. Returns the key or None."""
    from PIL import Image, ImageDraw

    store = open_store(outbox, get_settings())
    rows: list[tuple[str, list[Any]]] = []
    for label, key in entries[:500]:
        if store.stat(key) is None:
            continue
        frames = _three_frames(store.read(key))
        if frames:
            rows.append((label, [f.resize((max(1, f.width * THUMB // f.height), THUMB)) for f in frames]))
    if not rows:
        return None
    cell = max(sum(f.width for f in frames) + 4 * len(frames) for _, frames in rows)
    sheet = Image.new("RGB", (LABEL + cell, len(rows) * (THUMB + 4) + 4), (24, 24, 28))
    draw = ImageDraw.Draw(sheet)
    for index, (label, frames) in enumerate(rows):
        top = 4 + index * (THUMB + 4)
        for line, text in enumerate(_wrap(label, 32)[:5]):
            draw.text((6, top + 4 + line * 14), text, fill=(230, 230, 230))
        left = LABEL
        for frame in frames:
            sheet.paste(frame, (left, top))
            left += frame.width + 4
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    key = f"{prefix}{CONTACT_SHEET}"
    store.write(key, buffer.getvalue(), "image/png")
    return key


def _wrap(text: str, width: int) -> list[str]:
    return [text[i : i + width] for i in range(0, len(text), width)] or [""]


@task(name="write-campaign-report", retries=2, retry_delay_seconds=[2, 10])
def write_report(outbox: str, prefix: str, report: dict[str, Any]) -> str:
    """``<prefix>campaign.json``: the slot's items, their status and timings (rewritten each run)."""
    store = open_store(outbox, get_settings())
    key = f"{prefix}{REPORT}"
    store.write(key, json.dumps(report, indent=2, default=str).encode(), "application/json")
    return key


def local_path(outbox: str, key: str) -> str | None:
    """A path a person can open, for folder outboxes."""
    return None if outbox.startswith("s3://") else str(Path(outbox) / key)
