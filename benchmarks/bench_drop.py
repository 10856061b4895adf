"""Drop-to-video latency, orchestration overhead and GPU-worker scaling of the whole service.

Why: the folder pipeline's promise is "a few seconds later, a video", and on a GPU host the
GPU-hour is the cost: time the pipeline adds around a render, and GPUs left idle between renders,
are waste. This starts the processes `i2vflow up` starts (a fresh Prefect server on a free port,
the deployment, a flow worker, GPU workers each bound to one card, the watcher), then:

1. drops ``--jobs`` jobs one at a time, each once the last one's flow run has ended (a lone job
   meets an idle system): drop -> detected, -> flow run created, -> video, and the orchestration
   overhead (drop -> video minus the render time the GPU worker reports);
2. with ``--flood N``: drops N jobs per GPU worker at once, first with one GPU worker, then again
   after starting the others (``--gpu-workers K``): videos per hour and the ratio K workers / 1.

    python -m benchmarks.bench_drop --jobs 5                               # CPU, tiny model
    python -m benchmarks.bench_drop --jobs 5 --photo 3000x3000             # camera-sized JPEGs
    python -m benchmarks.bench_drop --model full --size 512 --frames 16 --steps 50 \\
        --jobs 3 --flood 6 --gpu-workers 2 --out benchmarks/results/drop-h100x2.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from infra.service import (
    Supervisor,
    apply_deployments,
    gpu_worker_bindings,
    prefect_env,
    start_gpu_worker,
    start_prefect_server,
    start_workers,
)
from infra.settings import Settings
from tests.helpers import png_bytes, render_task_run, wait_for
from tests.ports import free_port

LONE_JOB_GAP_S = 1.0  # between a lone job's flow run ending and the next drop


class RssSampler(threading.Thread):
    """Peak summed RSS of this process and every descendant."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.wait(0.2):
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5, help="jobs dropped one at a time")
    parser.add_argument("--flood", type=int, default=0, help="jobs per GPU worker dropped at once")
    parser.add_argument("--gpu-workers", type=int, default=1, help="GPU workers for the last flood")
    parser.add_argument("--model", default="tiny", help="registry name, model folder, or 'full' "
                        "(the full-size architecture with random weights, built here)")
    parser.add_argument("--size", type=int, default=None, help="width = height of every job")
    parser.add_argument("--photo", type=_dimensions, default=None, metavar="WxH",
                        help="drop camera-sized JPEGs of WxH pixels (e.g. 3000x3000) instead of small PNGs")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--model-cache", type=Path, default=None,
                        help="where 'full' is built (kept, so a second run reuses it); default a temp folder")
    parser.add_argument("--ready-timeout", type=float, default=600, help="seconds for a GPU worker's warm-up")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/drop-cpu.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="i2vflow-bench-"))
    inbox, outbox, state = work / "inbox", work / "outbox", work / "state"
    model = _model(args.model, args.model_cache or work / "models")
    gpus = gpu_worker_bindings(args.gpu_workers)
    sampler = RssSampler()
    sampler.start()
    sup = Supervisor(env=prefect_env("", state), log_dir=state / "logs")
    sup.env.pop("PREFECT_API_URL")
    sup.env["PREFECT_HOME"] = str(state / "prefect")
    command = "python -m benchmarks.bench_drop " + " ".join(sys.argv[1:] if argv is None else argv)
    slots = Settings().gpu_worker_slots
    summary: dict[str, Any] = {"command": command, "model": args.model, "gpus": gpus, "cpus": os.cpu_count(),
                               "gpu_worker_slots": slots, "bytecode": _bytecode(),
                               "dropped_image": f"{args.photo[0]}x{args.photo[1]} JPEG" if args.photo else "96x96 PNG"}
    try:
        api = start_prefect_server(sup, free_port(), lambda m: None)
        sup.env = prefect_env(api, state, {"I2VFLOW_MODEL_CACHE": str(work / "models"), "I2VFLOW_MODEL": model,
                                           "I2VFLOW_STATE_DIR": str(state), "PREFECT_HOME": str(state / "prefect"),
                                           "I2VFLOW_GPU_WORKER_METRICS_PORT": "0"})
        os.environ.update({k: sup.env[k] for k in ("PREFECT_API_URL", "PREFECT_LOCAL_STORAGE_PATH")})
        apply_deployments(sup.env, "i2vflow", len(gpus) * slots)
        summary["flow_command"] = _flow_command()
        summary["flow_forkserver"] = Settings().flow_forkserver
        summary["flow_worker_events"] = Settings().flow_worker_events
        summary["early_render"] = Settings().early_render
        summary["sqlite_queued_writes"] = Settings().sqlite_queued_writes
        started = time.time()
        start_workers(sup, "i2vflow", gpus[:1], summary["flow_forkserver"])
        summary["first_gpu_worker_ready_s"] = _wait_ready(sup, 1, args.ready_timeout) - started
        from flows.generate import hand_over_render
        from infra.watch.run import build_watcher

        watcher, close = build_watcher(Settings(inbox=str(inbox), outbox=str(outbox), state_dir=state, model=model),
                                       hand_over=hand_over_render)
        stop = threading.Event()
        threading.Thread(target=watcher.run, args=(stop,), daemon=True).start()
        spec = _spec(args)
        rows = [_one_job(f"job-{i}", spec, inbox, outbox, watcher, _image(100 + i, args.photo))
                for i in range(args.jobs)]
        summary.update(_latency_summary(rows))
        if args.flood:
            summary["flood"] = [_flood("one", args.flood, spec, inbox, outbox, args.photo)]
            if len(gpus) > 1:
                for index, gpu in enumerate(gpus[1:], start=1):
                    start_gpu_worker(sup, index, gpu)
                _wait_ready(sup, len(gpus), args.ready_timeout)
                summary["flood"].append(_flood("all", args.flood * len(gpus), spec, inbox, outbox, args.photo))
                one, every = summary["flood"]
                summary["scaling_videos_per_hour"] = round(every["videos_per_hour"] / one["videos_per_hour"], 3)
        stop.set()
        close()
    finally:
        sup.stop()
        sampler.stop.set()
    summary["peak_rss_service_mb"] = round(sampler.peak / 2**20)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "jobs"}, indent=2))
    return summary


def _bytecode() -> dict[str, bool]:
    """Whether flow processes start from compiled bytecode: without it each one compiles Prefect
    from source (1.2 s more per flow start on an H200 host whose image sets PYTHONDONTWRITEBYTECODE
    and whose packages were installed without bytecode; docs/performance.md)."""
    import importlib.util

    spec = importlib.util.find_spec("prefect")  # not imported here: its settings are read at import
    compiled = spec is not None and Path(importlib.util.cache_from_source(str(spec.origin))).exists()
    return {"prefect_precompiled": compiled, "writes_bytecode": not sys.dont_write_bytecode}


def _flow_command() -> str | None:
    """The command the process worker starts each flow run with (None: Prefect's default, a
    workspace supervisor that starts the engine as a second process)."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(Settings().deployment).job_variables.get("command")


def _model(name: str, cache: Path) -> str:
    if name != "full":
        return name
    from infra.engine.full import build_full_i2vgenxl

    return str(build_full_i2vgenxl(cache / "i2vgen-xl-random"))


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {"prompt": "product rotating slowly under studio light"}
    if args.size:
        spec.update(width=args.size, height=args.size)
    if args.frames:
        spec["num_frames"] = args.frames
    if args.steps:
        spec["steps"] = args.steps
    return spec


def _wait_ready(sup: Supervisor, workers: int, timeout: float) -> float:
    """Until ``workers`` GPU workers publish heartbeats (they start beating after warm-up)."""
    from prefect import get_client

    deadline = time.time() + timeout
    pids = {str(child.pid) for name, child in sup.children.items() if name.startswith("gpu-worker")}
    while time.time() < deadline:
        if sup.check():
            raise RuntimeError(f"a child died: {sup.check()}; see {sup.log_dir}")
        with get_client(sync_client=True) as client:
            names = [v.name for v in client.read_variables() if v.name.startswith("i2vflow-gpu-")]
        if sum(any(name.endswith(f"-{pid}") for name in names) for pid in pids) >= workers:
            return time.time()
        time.sleep(0.5)
    raise TimeoutError(f"{workers} GPU worker(s) not ready after {timeout} s; see {sup.log_dir}")


def _dimensions(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def _image(shade: int, photo: tuple[int, int] | None) -> tuple[str, bytes]:
    """A small PNG, or a photo-like JPEG (gradient, square, sensor noise) of a camera's size."""
    square = (shade * 30 % 255, 80, 120)
    if photo is None:
        return ".png", png_bytes(color=square)
    import io

    import numpy as np
    from PIL import Image

    width, height = photo
    pixels = np.empty((height, width, 3), dtype=np.int16)
    pixels[...] = (0, 60, 90)
    pixels[..., 0] = np.linspace(0, 255, height, dtype=np.int16)[:, None]
    pixels[height // 4:3 * height // 4, width // 4:3 * width // 4] = square
    pixels += np.random.default_rng(shade).integers(-6, 7, (height, width, 3), dtype=np.int16)
    encoded = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(encoded, format="JPEG", quality=90)
    return ".jpg", encoded.getvalue()


def _drop(stem: str, spec: dict[str, Any], inbox: Path, image: tuple[str, bytes]) -> None:
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / f"{stem}.json").write_text(json.dumps(spec))
    (inbox / f"{stem}{image[0]}").write_bytes(image[1])


def _wait_video(outbox: Path, stem: str, timeout: float = 300) -> dict[str, Any]:
    sidecar, deadline = outbox / f"{stem}.json", time.time() + timeout
    while not (sidecar.exists() and (outbox / f"{stem}.mp4").exists()):
        if (outbox / f"{stem}.error.json").exists() or time.time() > deadline:
            raise RuntimeError(f"{stem}: no video; see {outbox}")
        time.sleep(0.05)
    return {"at": sidecar.stat().st_mtime, **json.loads(sidecar.read_text())}


def _one_job(stem: str, spec: dict[str, Any], inbox: Path, outbox: Path, watcher: object,
             image: tuple[str, bytes]) -> dict[str, Any]:
    _drop(stem, spec, inbox, image)
    dropped = time.time()
    data = _wait_video(outbox, stem)
    from prefect import get_client

    with get_client(sync_client=True) as client:
        def ended() -> Any:
            run = client.read_flow_run(data["prefect"]["flow_run_id"])
            return run if run.state and run.state.is_final() else None

        # A lone job meets an idle system: the next is dropped once this run has ended and settled,
        # not while its last API writes still compete with the next run's for SQLite's lock.
        run = wait_for(ended, timeout=60, interval=0.1, what=f"{stem}'s flow run to end")
    time.sleep(LONE_JOB_GAP_S)
    phases = _phases(run, data)
    detected = watcher.ledger._query("SELECT created_at FROM jobs WHERE job_id=?", (data["job_id"],))[0][0]  # type: ignore[attr-defined]
    render = data["timings_seconds"]["render_on_model"]
    return {
        "drop_to_detected_s": round(detected - dropped, 3),
        "drop_to_run_created_s": round(run.created.timestamp() - dropped, 3),
        "drop_to_render_task_start_s": round(render_task_run(run.id).start_time.timestamp() - dropped, 3),
        "drop_to_video_s": round(data["at"] - dropped, 3),
        "render_s": render,
        "overhead_s": round(data["at"] - dropped - render, 3),
        "model_loads_in_process": data["engine"]["model_loads_in_process"],
        "gpu_worker_pid": data["engine"]["pid"],
        "phases_s": phases,
    }


def _phases(run: Any, sidecar: dict[str, Any]) -> dict[str, Any]:
    """Where a lone job's time goes after its flow run exists, from the run's and its task runs'
    own timestamps: waiting for a process worker and a fresh flow-run process, the flow's steps,
    the hand-over to the GPU worker, and what follows the render."""
    render = render_task_run(run.id)
    render_s = sidecar["timings_seconds"]["render_on_model"]
    encode = sidecar["timings_seconds"]["encode_on_gpu_worker"]

    def gap(a: Any, b: Any) -> float:
        return round(b.timestamp() - a.timestamp(), 3)

    pending = _state_time(run.id, "PENDING")
    received = _task_state_time(render.id, "PENDING")
    in_flow = datetime.fromisoformat(sidecar["created_at"]).timestamp()
    return {
        "run_created_to_flow_start": gap(run.created, run.start_time),
        "run_created_to_pending": gap(run.created, pending),  # a flow worker noticed and claimed it
        "pending_to_flow_start": gap(pending, run.start_time),  # its process started, the engine began
        # Negative where the watcher handed the render over before the flow run existed.
        "render_handed_over": render.flow_run_id is None,
        "flow_start_to_render_submitted": gap(run.start_time, render.created),
        "load_inputs": sidecar["timings_seconds"]["load_inputs"],  # inside the above: the flow's first task
        "render_submitted_to_task_start": gap(render.created, render.start_time),
        # Split by the Pending state the GPU worker records as it receives the render.
        "render_submitted_to_received": gap(render.created, received),  # the server's push
        "render_received_to_task_start": gap(received, render.start_time),  # the worker's set-up, its gpu slot
        "render_task_minus_render_and_encode": round(gap(render.start_time, render.end_time) - render_s - encode, 3),
        "render_task_end_to_video": round(sidecar["at"] - render.end_time.timestamp(), 3),
        # Split by the sidecar's created_at, stamped as the flow builds it from the render's result.
        "render_task_end_to_result_in_flow": round(in_flow - render.end_time.timestamp(), 3),
        "publish": round(sidecar["at"] - in_flow, 3),  # the publish task: MP4 and sidecar written
        "encode": encode,  # on the GPU worker, inside the render task
    }


def _task_state_time(task_run_id: Any, state_type: str) -> Any:
    """When the task run first entered ``state_type``, from its state history."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        states = client.read_task_run_states(task_run_id)
    return min(state.timestamp for state in states if state.type.value == state_type)


def _state_time(flow_run_id: Any, state_type: str) -> Any:
    """When the flow run first entered ``state_type``, from its state history."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        states = client.read_flow_run_states(flow_run_id)
    return min(state.timestamp for state in states if state.type.value == state_type)


def _latency_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"jobs": []}
    overhead, render = (statistics.median(r[k] for r in rows) for k in ("overhead_s", "render_s"))
    return {
        "jobs": rows,
        "median_drop_to_run_created_s": statistics.median(r["drop_to_run_created_s"] for r in rows),
        "median_drop_to_video_s": statistics.median(r["drop_to_video_s"] for r in rows),
        "median_render_s": render,
        "median_overhead_s": overhead,
        "overhead_share_of_render": round(overhead / render, 3),
        "model_loads": max(r["model_loads_in_process"] for r in rows),
    }


def _gpu_gaps(videos: list[dict[str, Any]]) -> dict[str, Any]:
    """What each GPU worker's GPU did during a flood, from the render task runs' end times and
    the seconds the engine reports: a render occupied the model from (task end - encode - render)
    to (task end - encode); the task encodes the MP4 after the render, off the model, and persists
    its result in ~10 ms. Per consecutive pair on one worker, the idle gap between the two; per
    worker, the share of its busy span spent rendering. With staging (I2VFLOW_GPU_WORKER_SLOTS=2)
    the next task run starts before the previous ends, so task start times say nothing about the
    GPU; these measures hold for any slot count."""
    rows = [(str(v["engine"]["pid"]),
             render_task_run(v["prefect"]["flow_run_id"]).end_time.timestamp()
             - v["timings_seconds"]["encode_on_gpu_worker"],
             v["timings_seconds"]["render_on_model"], v["timings_seconds"]["waiting_for_gpu"]) for v in videos]
    gaps: list[float] = []
    busy: list[float] = []
    for pid in {row[0] for row in rows}:
        runs = sorted((r for r in rows if r[0] == pid), key=lambda r: r[1])
        gaps += [(later[1] - later[2]) - earlier[1] for earlier, later in zip(runs, runs[1:], strict=False)]
        span = runs[-1][1] - (runs[0][1] - runs[0][2])
        busy.append(sum(r[2] for r in runs) / span)
    if not gaps:
        return {}
    render = statistics.median(r[2] for r in rows)
    return {"gpu_gap_median_s": round(statistics.median(gaps), 3),
            "gpu_gap_mean_s": round(statistics.mean(gaps), 3),
            "gpu_gaps_s": [round(gap, 3) for gap in gaps],
            "gpu_busy_share": round(statistics.mean(busy), 4),
            "gpu_idle_over_render": round(1 / statistics.mean(busy) - 1, 4),
            "gpu_gap_over_median_render": round(statistics.mean(gaps) / render, 4),
            "waiting_for_gpu_s": [r[3] for r in sorted(rows, key=lambda r: r[1])],
            "encode_on_gpu_worker_s": [v["timings_seconds"]["encode_on_gpu_worker"] for v in videos]}


def _flood(label: str, count: int, spec: dict[str, Any], inbox: Path, outbox: Path,
           photo: tuple[int, int] | None) -> dict[str, Any]:
    """Drop ``count`` jobs at once; time until the last video, and who rendered what."""
    stems = [f"flood-{label}-{i}" for i in range(count)]
    images = [_image(i, photo) for i in range(count)]
    started = time.time()
    for stem, image in zip(stems, images, strict=True):
        _drop(stem, spec, inbox, image)
    videos = [_wait_video(outbox, stem) for stem in stems]
    done = [v["at"] for v in videos]
    per_pid: dict[str, int] = {}
    for video in videos:
        per_pid[str(video["engine"]["pid"])] = per_pid.get(str(video["engine"]["pid"]), 0) + 1
    wall = max(done) - started
    return {
        "label": label,
        "jobs": count,
        "wall_s": round(wall, 2),
        "videos_per_hour": round(count / wall * 3600, 1),
        "steady_videos_per_hour": round((count - 1) / (max(done) - min(done)) * 3600, 1) if count > 1 else None,
        "median_render_s": statistics.median(v["timings_seconds"]["render_on_model"] for v in videos),
        "videos_per_gpu_worker": per_pid,
        **_gpu_gaps(videos),
    }


if __name__ == "__main__":
    main()
