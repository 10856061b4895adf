"""Load: a flood of drops at once, or a steady trickle, through a real watcher and Prefect server.

Why: exactly-once must hold under load, and the operator needs the cost of the watcher and of
the server. Runs go to a deployment on a work pool that no worker serves, so this measures
detection and submission, not renders; ``--render`` uses the normal pool with a flow worker and
the GPU worker (tiny model, 64x64, 8 frames, 10 steps) and counts videos and error files.
``--store bucket`` drops into a moto S3 server (its own process, measured like the others).
The drops are made by a child process, so their cost is not charged to the watcher.

    python -m benchmarks.bench_load --jobs 1000                   # flood into a folder
    python -m benchmarks.bench_load --jobs 1000 --store bucket    # flood into a bucket
    python -m benchmarks.bench_load --trickle 600                 # one drop a second for 10 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from infra.service import (
    PROJECT_ROOT,
    Supervisor,
    apply_deployments,
    prefect_env,
    start_prefect_server,
    start_workers,
)
from infra.settings import Settings
from tests.helpers import png_bytes
from tests.ports import free_port
from tests.s3server import S3Server

BUCKET = "load"
RUN_STATES = ("submitted", "done", "failed")  # the ledger has recorded the job's flow run
RENDER_SPEC = {"num_frames": 8, "steps": 10, "width": 64, "height": 64}


class Usage(threading.Thread):
    """Peak RSS and CPU seconds of one process, with its children when ``tree``. Not the tree for
    this process: the servers, the workers and the dropper are its children and are not the watcher."""

    def __init__(self, pid: int, tree: bool = True) -> None:
        super().__init__(daemon=True)
        self.proc, self.tree, self.peak, self.stopped = psutil.Process(pid), tree, 0, threading.Event()

    def procs(self) -> list[psutil.Process]:
        try:
            return [self.proc, *(self.proc.children(recursive=True) if self.tree else [])]
        except psutil.Error:  # stopped at the end of the run
            return []

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.procs():
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        return total

    def run(self) -> None:
        while not self.stopped.wait(0.25):
            rss = 0
            for proc in self.procs():
                with contextlib.suppress(psutil.Error):
                    rss += proc.memory_info().rss
            self.peak = max(self.peak, rss)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--trickle", type=int, default=0, help="seconds of one drop per second instead")
    parser.add_argument("--store", choices=("folder", "bucket"), default="folder")
    parser.add_argument("--render", action="store_true", help="render every job (tiny model) and count outputs")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for runs (and outputs)")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="i2vflow-load-"))
    state = work / "state"
    sup = Supervisor(env=prefect_env("", state, {"PREFECT_HOME": str(state / "prefect")}), log_dir=state / "logs")
    sup.env.pop("PREFECT_API_URL")
    try:
        api = start_prefect_server(sup, free_port(), lambda _: None)
        server_usage = Usage(sup.children["prefect-server"].pid)
        server_usage.start()
        s3 = start_s3_server(sup) if args.store == "bucket" else None
        extra = {"PREFECT_HOME": str(state / "prefect"), "I2VFLOW_MODEL": "tiny", "PREFECT_WORKER_QUERY_SECONDS": "1",
                 "I2VFLOW_MODEL_CACHE": str(work / "models"), "I2VFLOW_STATE_DIR": str(state / "service")}
        if s3 is not None:  # the flows read the inputs from the bucket too
            extra.update({"I2VFLOW_S3_ENDPOINT": s3.endpoint, "I2VFLOW_S3_REGION": s3.region,
                          "I2VFLOW_S3_ACCESS_KEY": s3.access_key, "I2VFLOW_S3_SECRET_KEY": s3.secret_key})
        sup.env = prefect_env(api, state, extra)
        os.environ.update({k: sup.env[k] for k in ("PREFECT_API_URL", "PREFECT_LOCAL_STORAGE_PATH")})
        apply_deployments(sup.env, "i2vflow", 1)
        if args.render:  # a process per flow run: 4 at once, or a flood starts hundreds on 2 cores
            subprocess.run([sys.executable, "-m", "prefect", "work-pool", "set-concurrency-limit", "i2vflow", "4"],
                           env=sup.env, cwd=PROJECT_ROOT, check=True, capture_output=True)
            start_workers(sup, "i2vflow")
            deployment = "generate-video/generate-video"
        else:
            deployment = idle_deployment(sup.env)
        s3_usage = Usage(sup.children["s3-server"].pid) if s3 is not None else None
        result = run(work, args, deployment, server_usage, s3, s3_usage)
    finally:
        sup.stop()
    kind = ("trickle" if args.trickle else "flood") + ("-bucket" if args.store == "bucket" else "")
    out = args.out or Path(f"benchmarks/results/load-{kind}-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


def start_s3_server(sup: Supervisor, timeout: float = 60) -> S3Server:
    """moto's S3 server in a child process: its CPU is then not the watcher's."""
    s3 = S3Server(endpoint=f"127.0.0.1:{free_port()}")
    sup.start("s3-server", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", s3.endpoint.split(":")[1]])
    deadline = time.monotonic() + timeout
    while True:
        try:
            s3.client().make_bucket(BUCKET)
            return s3
        except Exception:
            if time.monotonic() > deadline or sup.check():
                raise RuntimeError(f"moto did not start; see {sup.log_dir}/s3-server.log") from None
            time.sleep(0.5)


def idle_deployment(env: dict[str, str]) -> str:
    """generate-video deployed again on a pool that no worker serves: runs are created, never run."""
    def prefect(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=PROJECT_ROOT, check=True,
                       capture_output=True)

    prefect("work-pool", "create", "idle", "--type", "process")
    prefect("--no-prompt", "deploy", "flows.generate.generate_video", "--name", "load", "--pool", "idle")
    return "generate-video/load"


def drop_all(inbox: str, s3: S3Server | None, count: int, trickle: bool, spec: dict[str, Any],
             times: Path) -> None:
    """Drop ``count`` image+JSON pairs (JSON first, as many clients do) into a folder (plain writes)
    or ``s3://bucket/prefix``; write each stem's drop time."""
    image, dropped = png_bytes(), {}
    client = s3.client() if s3 is not None else None
    bucket, _, prefix = inbox.removeprefix("s3://").partition("/")
    for index in range(count):
        stem = f"load/{index:05d}"
        body = json.dumps({"prompt": f"item {index}", **spec}).encode()
        if client is not None:
            for suffix, data in ((".json", body), (".png", image)):
                client.put_object(bucket, f"{prefix}/{stem}{suffix}", io.BytesIO(data), len(data))
        else:
            (Path(inbox) / "load").mkdir(parents=True, exist_ok=True)
            (Path(inbox) / f"{stem}.json").write_bytes(body)
            (Path(inbox) / f"{stem}.png").write_bytes(image)
        dropped[stem] = time.time()
        if trickle:
            time.sleep(1.0)
    times.write_text(json.dumps(dropped))


def run(work: Path, args: argparse.Namespace, deployment: str, server_usage: Usage, s3: S3Server | None = None,
        s3_usage: Usage | None = None) -> dict[str, Any]:
    from flows.generate import hand_over_render
    from infra.store import open_store
    from infra.watch.run import build_watcher

    inbox, outbox = (f"s3://{BUCKET}/inbox", f"s3://{BUCKET}/outbox") if s3 else (str(work / "inbox"),
                                                                                   str(work / "outbox"))
    Path(work / "inbox").mkdir(parents=True, exist_ok=True)
    settings = Settings(inbox=inbox, outbox=outbox, state_dir=work / "state", deployment=deployment, metrics_port=0,
                        **(s3.settings_kwargs() if s3 else {}))
    # Without --render no GPU worker would take a handed-over render.
    watcher, close = build_watcher(settings, hand_over=hand_over_render if args.render else None)
    usages = [Usage(os.getpid(), tree=False), server_usage, *([s3_usage] if s3_usage else [])]
    for usage in usages:
        if not usage.is_alive():
            usage.start()
    cpu0 = [usage.cpu_seconds() for usage in usages]
    stop = threading.Event()
    threading.Thread(target=watcher.run, args=(stop,), daemon=True).start()
    count = args.trickle or args.jobs
    # A spawned child makes the drops: its client's CPU (2,000 S3 puts) is not the watcher's.
    dropper = multiprocessing.get_context("spawn").Process(target=drop_all, args=(
        inbox, s3, count, bool(args.trickle), RENDER_SPEC if args.render else {}, work / "dropped.json"))
    dropper.start()
    dropper.join()
    dropped: dict[str, float] = json.loads((work / "dropped.json").read_text())
    last_drop = max(dropped.values())
    deadline = time.monotonic() + args.timeout
    while (in_time := sum(n for state, n in watcher.ledger.counts().items() if state in RUN_STATES)) < count:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    outputs = wait_outputs(open_store(outbox, settings), count, deadline, last_drop) if args.render else {}
    cpu = [round(usage.cpu_seconds() - before, 1) for usage, before in zip(usages, cpu0, strict=True)]
    stop.set()
    watcher.wake.set()
    close()
    runs = runs_per_job(deployment)
    created = {stem: min(times) for stem, times in runs.items()}
    latencies = sorted(at - dropped[stem] for stem, at in created.items())
    result: dict[str, Any] = {
        "mode": "trickle 1/s" if args.trickle else "flood", "store": args.store, "rendered": args.render,
        "jobs": count, "runs_recorded_before_timeout": in_time,
        "last_drop_to_last_run_created_s": round(max(created.values(), default=last_drop) - last_drop, 2),
        "drop_to_run_created_s": {"p50": round(statistics.median(latencies), 2),
                                  "p95": round(latencies[int(0.95 * (len(latencies) - 1))], 2),
                                  "max": round(latencies[-1], 2)} if latencies else None,
        "flow_runs": sum(map(len, runs.values())),
        "jobs_with_more_than_one_run": sum(1 for times in runs.values() if len(times) > 1),
        "jobs_without_run": count - len(runs), **outputs,
        "watcher_peak_rss_mb": round(usages[0].peak / 2**20), "watcher_cpu_s": cpu[0],
        "server_peak_rss_mb": round(server_usage.peak / 2**20), "server_cpu_s": cpu[1], "cpus": os.cpu_count(),
    }
    if s3_usage is not None:
        result.update({"s3_server_peak_rss_mb": round(s3_usage.peak / 2**20), "s3_server_cpu_s": cpu[2],
                       "poll_seconds": watcher.settings.poll_seconds})
    return result


def wait_outputs(outbox: Any, count: int, deadline: float, last_drop: float) -> dict[str, Any]:
    """Videos and error files in the outbox, once every job has one (or at the deadline)."""
    while True:
        keys = [info.key for info in outbox.list()]
        videos = sum(1 for key in keys if key.endswith(".mp4"))
        errors = sum(1 for key in keys if key.endswith(".error.json"))
        if videos + errors >= count or time.monotonic() > deadline:
            return {"videos": videos, "error_files": errors,
                    "last_drop_to_last_output_s": round(time.time() - last_drop, 1)}  # within the 2 s poll
        time.sleep(2)


def runs_per_job(deployment_name: str) -> dict[str, list[float]]:
    """Creation times of the deployment's runs, by job stem (run names are "<last part>-<job id[:6]>")."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.client.schemas.sorting import FlowRunSort

    runs: dict[str, list[float]] = {}
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name)
        offset = 0
        while True:
            page = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id])),
                sort=FlowRunSort.ID_DESC, limit=200, offset=offset)
            for run in page:
                runs.setdefault(f"load/{run.name.rsplit('-', 1)[0]}", []).append(run.created.timestamp())
            if len(page) < 200:
                return runs
            offset += 200


if __name__ == "__main__":
    main()
