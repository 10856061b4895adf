"""Drop-to-video latency and service footprint on this machine, with the tiny model.

Why: the folder pipeline's promise is "a few seconds later, a video". This starts the same
processes `i2vflow up` starts (a fresh Prefect server on a free port, the deployment, a flow
worker, the GPU worker, the watcher), drops N jobs one at a time, and reports per job: drop ->
detected, drop -> flow run created, drop -> video; the model loads counted by the GPU worker;
and the peak RSS of the whole service (sampled every 0.2 s over all its processes).

    python -m benchmarks.bench_drop --jobs 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil

from infra.service import Supervisor, apply_deployments, prefect_env, start_prefect_server, start_workers
from infra.settings import Settings
from tests.helpers import png_bytes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/drop-cpu.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="i2vflow-bench-"))
    inbox, outbox, state = work / "inbox", work / "outbox", work / "state"
    sampler = RssSampler()
    sampler.start()
    sup = Supervisor(env=prefect_env("", state), log_dir=state / "logs")
    sup.env.pop("PREFECT_API_URL")
    sup.env["PREFECT_HOME"] = str(state / "prefect")
    try:
        api = start_prefect_server(sup, _free_port(), lambda m: None)
        sup.env = prefect_env(api, state, {"I2VFLOW_MODEL_CACHE": str(work / "models"),
                                           "I2VFLOW_STATE_DIR": str(state), "PREFECT_HOME": str(state / "prefect")})
        os.environ.update({k: sup.env[k] for k in ("PREFECT_API_URL", "PREFECT_LOCAL_STORAGE_PATH")})
        apply_deployments(sup.env, "i2vflow", 1)
        start_workers(sup, "i2vflow")
        from infra.watch.run import build_watcher

        watcher, close = build_watcher(Settings(inbox=str(inbox), outbox=str(outbox), state_dir=state))
        stop = threading.Event()
        threading.Thread(target=watcher.run, args=(stop,), daemon=True).start()
        rows = [_one_job(i, inbox, outbox, watcher) for i in range(args.jobs)]
        stop.set()
        close()
    finally:
        sup.stop()
        sampler.stop.set()
    summary = {
        "jobs": rows,
        "median_drop_to_run_created_s": statistics.median(r["drop_to_run_created_s"] for r in rows),
        "median_drop_to_video_s": statistics.median(r["drop_to_video_s"] for r in rows),
        "model_loads": max(r["model_loads_in_process"] for r in rows),
        "gpu_worker_pids": sorted({r["gpu_worker_pid"] for r in rows}),
        "peak_rss_service_mb": round(sampler.peak / 2**20),
        "cpus": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "jobs"}, indent=2))


def _one_job(index: int, inbox: Path, outbox: Path, watcher: object) -> dict[str, float]:
    stem = f"job-{index}"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / f"{stem}.json").write_text(json.dumps({"prompt": "product rotating slowly"}))
    (inbox / f"{stem}.png").write_bytes(png_bytes(color=(index * 30 % 255, 80, 120)))
    dropped = time.time()
    sidecar = outbox / f"{stem}.json"
    while not sidecar.exists():
        time.sleep(0.05)
    video_at = sidecar.stat().st_mtime
    data = json.loads(sidecar.read_text())
    record = watcher.ledger.get(data["job_id"])  # type: ignore[attr-defined]
    from prefect import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(data["prefect"]["flow_run_id"])
    detected = watcher.ledger._query("SELECT created_at FROM jobs WHERE job_id=?", (data["job_id"],))[0][0]  # type: ignore[attr-defined]
    assert record is not None
    return {
        "drop_to_detected_s": round(detected - dropped, 3),
        "drop_to_run_created_s": round(run.created.timestamp() - dropped, 3),
        "drop_to_video_s": round(video_at - dropped, 3),
        "render_s": data["timings_seconds"]["render_on_model"],
        "model_loads_in_process": data["engine"]["model_loads_in_process"],
        "gpu_worker_pid": data["engine"]["pid"],
    }


if __name__ == "__main__":
    main()
