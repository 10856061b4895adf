"""The fp8 Linear lever on a CPU (PyTorch runs ``_scaled_mm`` there too): real e4m3 numerics,
the swap inside the tiny UNet's transformers, and a render through it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from infra.engine.engine import Engine, RenderRequest
from infra.engine.fp8 import TRANSFORMER_CLASSES, Fp8Linear, fp8_supported, use_fp8_linears
from infra.engine.loader import EngineOptions

MakeRequest = Callable[..., RenderRequest]


def test_fp8_linear_matches_its_layer_within_e4m3_rounding() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    hidden = torch.randn(2, 10, 64)
    reference = linear(hidden)
    out = Fp8Linear(linear)(hidden)

    assert out.shape == reference.shape and out.dtype == reference.dtype
    relative = ((out - reference).norm() / reference.norm()).item()
    # e4m3 keeps 3 mantissa bits (relative step 1/8, rms error a few %); a wrong scale or a
    # transposed weight gives errors of order 1.
    assert 1e-4 < relative < 0.06


def test_fp8_linear_keeps_the_bias() -> None:
    linear = torch.nn.Linear(32, 16)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.constant_(linear.bias, 0.25)
    out = Fp8Linear(linear)(torch.randn(4, 32))
    torch.testing.assert_close(out, torch.full((4, 16), 0.25))


def test_swap_covers_every_eligible_transformer_linear(model_cache: Path, make_request: MakeRequest) -> None:
    engine = Engine(EngineOptions(device="cpu"), model_cache=model_cache)
    loaded = engine.warm("tiny")
    unet = loaded.pipeline.unet
    before = engine.render(make_request(seed=3)).frames
    eligible = {
        id(layer)
        for block in unet.modules() if type(block).__name__ in TRANSFORMER_CLASSES
        for layer in block.modules()
        if type(layer) is torch.nn.Linear and layer.in_features % 16 == 0 and layer.out_features % 16 == 0
    }
    assert eligible, "the tiny UNet has 16-wide layers: the swap must have work to do"

    assert use_fp8_linears(unet) == len(eligible)
    assert sum(isinstance(m, Fp8Linear) for m in unet.modules()) == len(eligible)
    after = engine.render(make_request(seed=3)).frames
    assert after.shape == before.shape
    assert not np.array_equal(after, before)  # quantised matmuls: other numbers, same video shape


def test_fp8_is_not_offered_without_a_gpu_that_has_it() -> None:
    assert fp8_supported("cpu") is False
