"""The fused-GEGLU lever's routing, on a CPU: every plain ``GEGLU`` of the UNet becomes a
``FusedGEGLU`` with the same parameters, and every call the kernel does not serve (here: all,
no CUDA) runs diffusers' own GEGLU, so off CUDA the video is bit-identical.

The Triton kernel itself runs only on CUDA; ``benchmarks/bench_kernels.py`` checks it against
diffusers' GEGLU at the UNet's shapes (results in ``benchmarks/results/kernels-*.json``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers.models.activations import GEGLU

from infra.engine.engine import Engine, RenderRequest
from infra.engine.fused_geglu import FusedGEGLU, use_fused_geglu
from infra.engine.loader import EngineOptions
from infra.engine.speed import SpeedPlan, apply_plan

MakeRequest = Callable[..., RenderRequest]


def test_every_geglu_is_fused_with_its_parameters_and_the_frames_stay(
    model_cache: Path, make_request: MakeRequest
) -> None:
    engine = Engine(EngineOptions(device="cpu"), model_cache=model_cache)
    unet = engine.warm("tiny").pipeline.unet
    before = engine.render(make_request(seed=4)).frames
    geglus = [m for m in unet.modules() if type(m) is GEGLU]
    names = sorted(name for name, _ in unet.named_parameters())
    assert geglus

    assert use_fused_geglu(unet) == len(geglus)
    assert use_fused_geglu(unet) == 0  # applying twice converts nothing twice
    assert all(type(m) is FusedGEGLU for m in geglus) and not any(type(m) is GEGLU for m in unet.modules())
    assert sorted(name for name, _ in unet.named_parameters()) == names
    np.testing.assert_array_equal(engine.render(make_request(seed=4)).frames, before)


def test_serves_only_what_the_kernel_computes() -> None:
    torch.manual_seed(0)
    module = GEGLU(64, 128)
    reference = module(torch.randn(3, 5, 64))
    module.__class__ = FusedGEGLU
    hidden = torch.randn(3, 5, 64)
    assert not module.serves(hidden)  # not CUDA
    assert not module.serves(hidden.half())  # still not CUDA
    torch.testing.assert_close(module(hidden), GEGLU.forward(module, hidden))
    assert module(hidden).shape == reference.shape == (3, 5, 128)


def test_the_plan_applies_the_lever_where_it_can_and_skips_it_on_a_cpu(model_cache: Path) -> None:
    loaded = Engine(EngineOptions(device="cpu", preset="stock", fused_geglu=True), model_cache=model_cache).warm("tiny")
    # On a CPU the plan skips the lever (a CUDA kernel) and says why; the modules stay diffusers'.
    assert loaded.speed.fused_geglu is False
    assert any(reason.startswith("fused_geglu (CUDA only") for reason in loaded.speed.skipped)
    assert not any(type(m) is FusedGEGLU for m in loaded.pipeline.unet.modules())
    # A plan that has it (as resolved on a GPU) converts the UNet's GEGLUs when applied.
    applied = apply_plan(loaded.pipeline, SpeedPlan(fused_geglu=True))
    assert applied.fused_geglu and any(type(m) is FusedGEGLU for m in loaded.pipeline.unet.modules())
