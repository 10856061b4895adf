"""The per-block benchmark's CPU path: the tiny UNet's blocks captured from a real call, one compiled for real.
Structure only; no timings are asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.bench_blocks import run
from infra.engine.speed import REGION_CLASSES


def test_tiny_run_covers_every_block_call_and_compiles_the_costliest(tmp_path: Path) -> None:
    import torch._inductor.config as inductor_config

    # The run sets these process-wide; the config's own patch puts them back. (pytest's monkeypatch
    # would not: undoing it hides a torch config entry, and a later read of it raises.)
    switches = ("force_layout_optimization", "coordinate_descent_tuning")
    with inductor_config.patch({switch: getattr(inductor_config, switch) for switch in switches}):
        report = run(["--tiny", "--size", "64", "--frames", "4", "--settings", "eager,default", "--limit", "1",
                      "--out", str(tmp_path)])

    written = json.loads((tmp_path / "blocks-cpu-64x4.json").read_text())
    assert written["totals"] == report["totals"]
    from diffusers import I2VGenXLUNet

    from infra.engine.tiny import CONFIG_DIR, component_config

    unet = I2VGenXLUNet.from_config(component_config("unet", CONFIG_DIR))
    region_modules = sum(type(m).__name__ in REGION_CLASSES for m in unet.modules())
    blocks = written["blocks"]
    # Each region module runs once per UNet call; the distinct shapes share their count.
    assert sum(b["count"] for b in blocks) == region_modules
    assert len(blocks) < region_modules
    assert all(b["results"]["eager"]["ms"] > 0 for b in blocks)
    costliest = blocks[0]
    assert costliest["results"]["default"]["first_call_s"] > 0 and costliest["results"]["default"]["ms"] > 0
    assert all("default" not in b["results"] for b in blocks[1:])
    assert written["totals"]["blocks_measured"] == 1
    assert written["totals"]["calls_covered"] == costliest["count"]


def test_unknown_setting_is_refused_by_name() -> None:
    with pytest.raises(SystemExit):
        run(["--tiny", "--settings", "eager,turbo"])
