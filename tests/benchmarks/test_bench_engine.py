"""The benchmark's CPU path on the tiny model: the same code the GPU run uses, so it cannot rot.

Asserts the structure of the report and its files, never timings (CI machines vary).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

from benchmarks.bench_engine import VARIANTS, run  # noqa: E402


def test_cpu_benchmark_writes_json_and_markdown(tmp_path: Path) -> None:
    out = tmp_path / "results"
    report = run(
        ["--tiny", "--device", "cpu", "--size", "64", "--frames", "4", "--steps", "2",
         "--repeats", "1", "--warmup", "0", "--variants", "stock,auto,dpm25",
         "--model-cache", str(tmp_path / "models"), "--out", str(out)],
        log=lambda _line: None,
    )
    names = [v["name"] for v in report["variants"]]
    assert names == ["stock", "auto", "dpm25"]
    for variant in report["variants"]:
        assert variant["status"] == "ok", variant["error"]
        assert variant["median_seconds"] > 0 and variant["first_call_seconds"] > 0
        assert variant["tflops"] is not None and variant["peak_gib"] is None  # CPU: no GPU peak
        assert variant["drift_rel_l2"] is not None and variant["nonfinite"] is False
    stock, auto, dpm = report["variants"]
    assert stock["drift_rel_l2"] == 0.0
    # On a CPU the engine changes nothing: its frames equal stock's, bit for bit.
    assert auto["drift_rel_l2"] == 0.0
    # A quality trade is reported with how far it drifts from stock.
    assert dpm["drift_rel_l2"] > 0 and dpm["speed"]["scheduler"] == "dpm++"
    assert auto["speed"]["preset"] == "stock" and auto["speed"]["compile"] == "off"
    assert report["flops_per_video_tflop"] is not None
    files = sorted(p.name for p in out.iterdir())
    assert files == ["engine-cpu-64x4.json", "engine-cpu-64x4.md"]
    saved = json.loads((out / "engine-cpu-64x4.json").read_text())
    assert saved["environment"]["device"] == "cpu" and saved["config"]["size"] == 64
    table = (out / "engine-cpu-64x4.md").read_text()
    assert "| stock |" in table and "| auto |" in table


def test_every_variant_is_engine_options() -> None:
    from infra.engine.loader import EngineOptions

    for name, fields in VARIANTS.items():
        if fields is not None:
            EngineOptions(**fields).check()  # raises on a bad lever name or value
        else:
            assert name == "stock"
