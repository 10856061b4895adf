"""The kernel benchmark's CPU path: fp8, tiled GroupNorm and channels-last ResNet inputs measured for
real, the CUDA kernel reported as skipped (never silently absent). Structure and error bounds only;
no timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


def test_some_rows_update_the_gpus_report_and_keep_the_others(tmp_path: Path) -> None:
    earlier = {"device": "cpu", "torch": "2.0", "fp8_linear": [{"relative_error": 0.01}],
               "channels_last_inputs": [{"stale": True}]}
    (tmp_path / "kernels-cpu.json").write_text(json.dumps(earlier))
    report = json.loads(main(["--device", "cpu", "--out", str(tmp_path), "--rows", "channels_last_inputs"]).read_text())
    assert report["fp8_linear"] == [{"relative_error": 0.01}]  # not measured this time: kept as it was
    (resnet,) = report["channels_last_inputs"]
    assert resnet["input"] == [2, 96, 16, 16] and "stale" not in resnet
    assert report["torch_by_rows"] == {"channels_last_inputs": torch.__version__}


def test_an_unknown_row_name_is_refused_with_the_known_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--device", "cpu", "--out", str(tmp_path), "--rows", "geglu"])
    assert stop.value.code == 2
    assert "unknown rows ['geglu']; known: short_attention, fp8_linear" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
