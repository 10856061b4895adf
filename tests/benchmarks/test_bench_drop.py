"""The service benchmark's CPU path: the command the GPU-host figures come from, run on the tiny
model with two GPU workers, so its flood and scaling code cannot rot. No timings asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from infra.service import PROJECT_ROOT


def test_bench_drop_runs_the_service_with_two_gpu_workers(tmp_path: Path) -> None:
    out = tmp_path / "drop.json"
    # Its own Prefect server, not the test session's: a clean environment like an operator's shell.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    subprocess.run([sys.executable, "-m", "benchmarks.bench_drop", "--jobs", "1", "--flood", "2",
                    "--gpu-workers", "2", "--photo", "640x480", "--out", str(out)],
                   cwd=PROJECT_ROOT, env=env, check=True, timeout=900, capture_output=True)
    report = json.loads(out.read_text())
    assert report["gpus"] == [None, None]
    assert report["dropped_image"] == "640x480 JPEG"  # camera-style inputs, not only small PNGs
    # One process per flow run (prefect.yaml), forked from the fork server `up` starts beside the worker.
    assert report["flow_command"] == "python3 -m infra.forkserver run prefect.engine"
    assert report["flow_forkserver"] is True and report["flow_worker_events"] is True
    assert report["early_render"] is True and report["sqlite_queued_writes"] is True
    assert set(report["bytecode"]) == {"prefect_precompiled", "writes_bytecode"}
    assert len(report["jobs"]) == 1 and report["jobs"][0]["overhead_s"] > 0
    one, both = report["flood"]
    assert (one["jobs"], both["jobs"]) == (2, 4)
    assert sum(one["videos_per_gpu_worker"].values()) == 2
    assert sum(both["videos_per_gpu_worker"].values()) == 4
    # Where a lone job's time went, from Prefect's own timestamps; the GPU's gaps in a flood.
    phases = report["jobs"][0]["phases_s"]
    assert phases["run_created_to_flow_start"] > 0 and phases["render_task_end_to_video"] > 0
    # Split at the run's Pending state (claimed by the worker), which lies between the two.
    assert phases["run_created_to_pending"] > 0 and phases["pending_to_flow_start"] > 0
    split = phases["run_created_to_pending"] + phases["pending_to_flow_start"]
    assert abs(split - phases["run_created_to_flow_start"]) <= 0.002
    # The watcher handed the render over before the flow run existed, so before the flow started.
    assert phases["render_handed_over"] is True and phases["flow_start_to_render_submitted"] < 0 < phases["load_inputs"]
    assert len(one["gpu_gaps_s"]) == 1 and 0 < one["gpu_busy_share"] <= 1.05
    assert report["scaling_videos_per_hour"] > 0
