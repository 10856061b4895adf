"""Small helpers shared by tests: make real images, wait for real files, read real videos."""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

FAST_SPEC = {"num_frames": 8, "steps": 10}


def png_bytes(width: int = 96, height: int = 96, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """A real PNG: a coloured square on a gradient, different per colour."""
    image = Image.new("RGB", (width, height), (20, 20, 30))
    draw = ImageDraw.Draw(image)
    for y in range(height):
        draw.line([(0, y), (width, y)], fill=(y * 255 // max(height, 1), 60, 90))
    draw.rectangle([width // 4, height // 4, 3 * width // 4, 3 * height // 4], fill=color)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def drop(folder: Path, stem: str, spec: dict[str, Any] | bytes | None, image: bytes | None = None,
         suffix: str = ".png") -> None:
    """Write an image and/or a JSON spec the way a user would (plain writes)."""
    path = folder / stem
    path.parent.mkdir(parents=True, exist_ok=True)
    if image is not None:
        path.with_name(path.name + suffix).write_bytes(image)
    if spec is not None:
        raw = spec if isinstance(spec, bytes) else json.dumps(spec).encode()
        path.with_name(path.name + ".json").write_bytes(raw)


def wait_for(predicate: Callable[[], Any], timeout: float = 180, interval: float = 0.5, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``: to prove inputs were not touched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def png_claiming_size(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims ``width`` x ``height``: a decompression bomb's shape."""
    import struct
    import zlib

    raw = bytearray(png_bytes(16, 16))
    # IHDR data starts after the 8-byte signature, 4-byte length and 4-byte type.
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    return bytes(raw)


def flow_runs_named(names: list[str]) -> list[Any]:
    """Flow runs on the Prefect server with these names."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names)))


def render_task_run(flow_run_id: Any) -> Any:
    """The render-video task run a flow run awaits: the last one it submitted itself (earlier
    ones lost their worker), else the one the watcher handed over at detection. ValueError: none yet."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        own = [run for run in runs if run.name.startswith("render-video")]
        if own:
            return max(own, key=lambda run: run.created)
        handover = (client.read_flow_run(flow_run_id).parameters or {}).get("handover")
        if handover is None:
            raise ValueError(f"flow run {flow_run_id} has no render task run yet")
        return client.read_task_run(handover["task_run_id"])


def wait_for_scans(*watchers: Any, count: int = 3, timeout: float = 90) -> None:
    """Wait until each watcher has completed ``count`` more looks at its inbox: only then does
    "no second run" say anything (a watcher that has not looked yet submits nothing either)."""
    targets = [(watcher, watcher.scans + count) for watcher in watchers]
    wait_for(lambda: all(watcher.scans >= target for watcher, target in targets), timeout=timeout,
             interval=0.1, what=f"{count} completed looks of each watcher")


def structlog_events_in_prefect(flow_run_id: str, render_task_run_id: str | None = None) -> list[str]:
    """The i2vflow JSON log lines that reached the run's (and a handed-over render's) logs on the server."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTaskRunId

    def events() -> list[str]:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            if render_task_run_id:
                logs += client.read_logs(log_filter=LogFilter(
                    task_run_id=LogFilterTaskRunId(any_=[render_task_run_id])))
        found = []
        for log in logs:
            if log.name.startswith("i2vflow") and log.message.startswith("{"):
                record = json.loads(log.message)
                found.append(record["event"])
        return found

    wanted = {"job.done", "render.done", "video.published"} | ({"render.handed_over"} if render_task_run_id else set())
    return wait_for(lambda: (e := events()) and wanted <= set(e) and e, timeout=60, what="logs in Prefect")
