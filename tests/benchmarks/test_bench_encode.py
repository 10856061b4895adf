"""The encode benchmark's small run: every encode verified beside a calibrated GIL holder, the report written.
Structure only; no timings asserted."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.bench_encode import run


def test_a_small_run_encodes_alone_fed_and_beside_a_gil_holder_and_writes_its_report(tmp_path: Path) -> None:
    report = run(["--frames", "8", "--size", "64", "--hold-ms", "20", "--repeats", "2", "--out", str(tmp_path),
                  "--label", "test"])

    assert json.loads((tmp_path / "encode-64x8-test.json").read_text()) == report
    assert len(report["alone"]["seconds"]) == 2 and report["alone"]["failures"] == []
    (row,) = report["beside_gil_holder"]
    assert 5 <= row["hold_ms"] <= 200, "the holder is calibrated near the asked hold"
    assert len(row["seconds"]) == 2 and row["failures"] == []
    assert row["x_alone"] == round(row["median_seconds"] / report["alone"]["median_seconds"], 2)
    assert len(report["streamed"]["tail_seconds"]) == 2, "the encode fed frame by frame, its tail timed"
    assert report["x264"]["tune"] == "zerolatency"
