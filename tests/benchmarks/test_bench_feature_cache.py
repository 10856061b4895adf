"""The FLOP count behind ``feature_cache_interval``: the tiny UNet on the meta device. The deep
step must count what the UNet's own forward counts; a shallow step less."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_feature_cache import meta_unet, run, step_inputs


def test_the_deep_step_counts_the_unets_own_flops_and_a_shallow_step_fewer(tmp_path: Path) -> None:
    report = run(["--tiny", "--shapes", "64x8,128x4", "--out", str(tmp_path)])

    assert json.loads((tmp_path / "feature-cache-flops-tiny.json").read_text())["rows"] == report["rows"]
    unet = meta_unet(tiny=True)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(**step_inputs(unet, 64, 8))
    first = report["rows"][0]
    assert first["shape"] == "64x8"
    assert first["deep_flops"] == counter.get_total_flops() > first["shallow_flops"] > 0
    for row in report["rows"]:
        assert 0 < row["shallow_over_deep"] < 1
        shares = row["unet_work_by_interval"]
        assert 1 > shares["2"] > shares["3"] > shares["5"] > row["shallow_over_deep"]
