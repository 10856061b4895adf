"""What a step on cached features costs (``feature_cache_interval``), counted in FLOPs.

Why: a shallow step (stem, first down block, last up block on the kept deep feature) skips most
of a UNet step, and how much bounds what the lever can gain: at an interval N a render's UNet
work is ``(1 + (N - 1) * shallow / deep) / N`` of the full one. Counting needs neither weights nor
a GPU: the full-size UNet is built on the ``meta`` device and both steps run there under
``FlopCounterMode``, at a render's shapes (batch 2 for guidance). Time on a GPU follows FLOPs
only roughly (the outer level is the most memory-bound), so seconds and drift come from
``bench_engine --variants stock,fast,fast-cache3``.

    python -m benchmarks.bench_feature_cache --shapes 512x16,768x24
    python -m benchmarks.bench_feature_cache --tiny --shapes 64x8     # the test path
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from infra.engine.feature_cache import DeepStep, ShallowStep
from infra.engine.full import FULL_CONFIG_DIR
from infra.engine.tiny import CONFIG_DIR, component_config

RESULTS_DIR = Path(__file__).parent / "results"
INTERVALS = (2, 3, 5)


def meta_unet(tiny: bool) -> torch.nn.Module:
    """The UNet from its config in the repo, on the meta device (shapes only, no memory)."""
    from diffusers import I2VGenXLUNet

    with torch.device("meta"):
        return I2VGenXLUNet.from_config(component_config("unet", CONFIG_DIR if tiny else FULL_CONFIG_DIR)).half()


def step_inputs(unet: torch.nn.Module, size: int, frames: int) -> dict[str, torch.Tensor]:
    """One guided step's UNet inputs at ``size`` x ``size`` pixels (latents 8 times smaller)."""
    side, batch, config = size // 8, 2, unet.config

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="meta", dtype=torch.float16)

    return {"sample": randn(batch, config.in_channels, frames, side, side),
            "timestep": torch.tensor([500], device="meta"), "fps": torch.tensor([8] * batch, device="meta"),
            "image_latents": randn(batch, config.in_channels, frames, side, side),
            "image_embeddings": randn(batch, config.cross_attention_dim),
            "encoder_hidden_states": randn(batch, 77, config.cross_attention_dim)}


def count(unet: torch.nn.Module, size: int, frames: int) -> dict[str, Any]:
    """FLOPs of a full (deep) step and of a shallow one, and the UNet share per interval."""
    inputs = step_inputs(unet, size, frames)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _prediction, feature = DeepStep(unet)(**inputs)
    deep = counter.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ShallowStep(unet)(feature, **inputs)
    shallow = counter.get_total_flops()
    return {"shape": f"{size}x{frames}", "deep_flops": deep, "shallow_flops": shallow,
            "deep_tflop": round(deep / 1e12, 2), "shallow_tflop": round(shallow / 1e12, 2),
            "shallow_over_deep": round(shallow / deep, 3),
            "unet_work_by_interval": {str(n): round((1 + (n - 1) * shallow / deep) / n, 3) for n in INTERVALS}}


def run(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="512x16,768x24", help="comma list of SIZExFRAMES")
    parser.add_argument("--tiny", action="store_true", help="the tiny model's UNet (test path)")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    unet = meta_unet(args.tiny)
    rows = []
    for shape in args.shapes.split(","):
        size, frames = (int(part) for part in shape.split("x"))
        rows.append(count(unet, size, frames))
        print(rows[-1], flush=True)
    report = {"command": "python -m benchmarks.bench_feature_cache " + " ".join(argv or sys.argv[1:]),
              "model": "tiny" if args.tiny else "i2vgen-xl-full", "torch": torch.__version__, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"feature-cache-flops{'-tiny' if args.tiny else ''}.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    run()
