"""The kernel benchmark's CPU path: fp8, tiled GroupNorm and channels-last ResNet inputs measured for
real, the CUDA kernel reported as skipped (never silently absent). Structure and error bounds only;
no timings."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.bench_kernels import main


def test_cpu_run_reports_fp8_and_group_norm_errors_and_skips_the_cuda_kernel(tmp_path: Path) -> None:
    report = json.loads(main(["--device", "cpu", "--out", str(tmp_path)]).read_text())
    assert report["device"] == "cpu"
    assert report["short_attention"] == [{"skipped": "short_attention is a CUDA kernel"}]
    (row,) = report["fp8_linear"]
    assert 1e-4 < row["relative_error"] < 0.06
    assert "fp8_ms" not in row  # timings only where the fp8 tensor cores are
    (norm,) = report["channels_last_group_norm"]
    assert norm["input"] == [1, 64, 3, 12, 12] and norm["tiled_max_abs_error"] < 1e-4
    assert "tiled_ms" not in norm
    (resnet,) = report["channels_last_inputs"]
    assert resnet["input"] == [2, 96, 16, 16] and resnet["max_abs_error"] < 1e-4  # compiled, with and without
    assert "lever_ms" not in resnet
