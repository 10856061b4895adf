"""Load: a flood of drops at once, or a steady trickle, through a real watcher and Prefect server.

Why: exactly-once must hold under load, and the operator needs the cost of the watcher and of
the server. Runs go to a deployment on a work pool that no worker serves (pass --render to use
the normal pool with a flow worker and the GPU worker), so this measures detection and
submission, not renders.

    python -m benchmarks.bench_load --jobs 1000            # flood
    python -m benchmarks.bench_load --trickle 600          # one drop a second for 10 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from benchmarks.bench_drop import _free_port
from infra.service import PROJECT_ROOT, Supervisor, apply_deployments, prefect_env, start_prefect_server
from infra.settings import Settings
from tests.helpers import png_bytes


class Usage(threading.Thread):
    """Peak RSS and CPU seconds of one process tree."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc, self.peak, self.stopped = psutil.Process(pid), 0, threading.Event()

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in [self.proc, *self.proc.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        return total

    def run(self) -> None:
        while not self.stopped.wait(0.25):
            rss = 0
            for proc in [self.proc, *self.proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    rss += proc.memory_info().rss
            self.peak = max(self.peak, rss)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--trickle", type=int, default=0, help="seconds of one drop per second instead")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="i2vflow-load-"))
    state = work / "state"
    sup = Supervisor(env=prefect_env("", state, {"PREFECT_HOME": str(state / "prefect")}), log_dir=state / "logs")
    sup.env.pop("PREFECT_API_URL")
    try:
        api = start_prefect_server(sup, _free_port(), lambda _: None)
        server_usage = Usage(sup.children["prefect-server"].pid)
        server_usage.start()
        sup.env = prefect_env(api, state, {"PREFECT_HOME": str(state / "prefect")})
        os.environ.update({"PREFECT_API_URL": api})
        apply_deployments(sup.env, "i2vflow", 1)
        subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", "idle", "--type", "process"],
                       env=sup.env, cwd=PROJECT_ROOT, check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "flows.generate.generate_video",
                        "--name", "load", "--pool", "idle"], env=sup.env, cwd=PROJECT_ROOT, check=True,
                       capture_output=True)
        result = _run(work, args, server_usage)
    finally:
        sup.stop()
    out = args.out or Path(f"benchmarks/results/load-{'trickle' if args.trickle else 'flood'}-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def _run(work: Path, args: argparse.Namespace, server_usage: Usage) -> dict[str, object]:
    from infra.watch.run import build_watcher

    inbox, outbox, state = work / "inbox", work / "outbox", work / "state"
    watcher, close = build_watcher(Settings(inbox=str(inbox), outbox=str(outbox), state_dir=state,
                                            deployment="generate-video/load", metrics_port=0))
    me = Usage(os.getpid())
    me.start()
    cpu0, server_cpu0 = me.cpu_seconds(), server_usage.cpu_seconds()
    stop = threading.Event()
    threading.Thread(target=watcher.run, args=(stop,), daemon=True).start()
    image = png_bytes()
    count = args.trickle or args.jobs
    dropped: dict[str, float] = {}
    for index in range(count):
        stem = f"load/{index:05d}"
        (inbox / "load").mkdir(parents=True, exist_ok=True)
        (inbox / f"{stem}.json").write_text(json.dumps({"prompt": f"item {index}"}))
        (inbox / f"{stem}.png").write_bytes(image)
        dropped[stem] = time.time()
        if args.trickle:
            time.sleep(1.0)
    last_drop = time.time()
    while watcher.ledger.counts().get("submitted", 0) < count:
        time.sleep(0.2)
    last_created = max(r[0] for r in watcher.ledger._query("SELECT updated_at FROM jobs"))  # noqa: SLF001
    latencies = sorted(float(updated) - dropped[str(stem)] for stem, updated in
                       watcher.ledger._query("SELECT stem, updated_at FROM jobs"))  # noqa: SLF001
    stop.set()
    close()
    runs = _runs_per_job(watcher)
    return {
        "mode": "trickle 1/s" if args.trickle else "flood", "jobs": count,
        "last_drop_to_last_run_created_s": round(last_created - last_drop, 2),
        "drop_to_run_created_s": {"p50": round(statistics.median(latencies), 2),
                                  "p95": round(latencies[int(0.95 * (len(latencies) - 1))], 2),
                                  "max": round(latencies[-1], 2)},
        "flow_runs": sum(runs.values()), "jobs_with_more_than_one_run": sum(1 for n in runs.values() if n > 1),
        "jobs_without_run": count - len(runs),
        "watcher_peak_rss_mb": round(me.peak / 2**20), "watcher_cpu_s": round(me.cpu_seconds() - cpu0, 1),
        "server_peak_rss_mb": round(server_usage.peak / 2**20),
        "server_cpu_s": round(server_usage.cpu_seconds() - server_cpu0, 1), "cpus": os.cpu_count(),
    }


def _runs_per_job(watcher: object) -> dict[str, int]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.client.schemas.sorting import FlowRunSort

    counts: dict[str, int] = {}
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("generate-video/load")
        offset = 0
        while True:
            page = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id])),
                sort=FlowRunSort.ID_DESC, limit=200, offset=offset)
            for run in page:
                counts[run.name] = counts.get(run.name, 0) + 1
            if len(page) < 200:
                return counts
            offset += 200


if __name__ == "__main__":
    main()
