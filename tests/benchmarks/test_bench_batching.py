"""The batching probe's CPU path on the tiny model (the GPU figures come from the same code)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.bench_batching import main


def test_batching_probe_reports_seconds_per_video_at_batch_one_and_two(tmp_path: Path) -> None:
    report = main(["--tiny", "--device", "cpu", "--size", "64", "--frames", "8", "--steps", "2",
                   "--repeats", "1", "--model-cache", str(tmp_path / "models"), "--out", str(tmp_path)])
    (row,) = report["rows"]
    assert row["mode"] == "eager"
    assert row["s_per_video_batch1"] > 0 and row["s_per_video_batch2"] > 0
    assert json.loads((tmp_path / "batching-cpu.json").read_text())["rows"] == [row]
