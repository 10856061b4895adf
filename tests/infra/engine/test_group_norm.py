"""The channels-last GroupNorm lever on a CPU: the tiled statistics and their combination per
group give ``torch.nn.GroupNorm``'s output for every layout the UNet hands it, the module class
swap sends only video-shaped inputs larger than its limit to the tiles, and a real render with it
matches one without.

The Triton statistics kernel runs only on CUDA; ``benchmarks/bench_kernels.py`` checks it
against ``tile_statistics`` and times it against inductor's GroupNorm at the UNet's shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from infra.engine import group_norm as group_norm_module
from infra.engine.aot import module_fingerprint
from infra.engine.channels_last import convert_weights
from infra.engine.engine import Engine, RenderRequest
from infra.engine.group_norm import (
    TILE_POSITIONS,
    ChannelsLastGroupNorm,
    group_norm,
    min_tiled_bytes,
    tile_statistics,
    use_channels_last_group_norm,
)
from infra.engine.loader import EngineOptions
from infra.engine.speed import resolve_plan

MakeRequest = Callable[..., RenderRequest]


def frames_first(batch: int, frames: int, channels: int, height: int, width: int) -> torch.Tensor:
    """A (batch, C, frames, H, W) view of channels-last frames, as the UNet's temporal layers see it."""
    flat = torch.randn(batch * frames, channels, height, width).contiguous(memory_format=torch.channels_last)
    return flat[None].reshape(batch, frames, channels, height, width).permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize("make", [
    lambda: torch.randn(3, 64, 17, 19).contiguous(memory_format=torch.channels_last),  # ResNet norms
    lambda: frames_first(2, 5, 64, 11, 13),  # temporal convolutions and transformers
    lambda: torch.randn(2, 64, 3, 40, 40).contiguous(memory_format=torch.channels_last_3d),  # > 2 tiles
])
@pytest.mark.parametrize("affine", [True, False])
def test_tiled_statistics_give_group_norm(make: Callable[[], torch.Tensor], affine: bool) -> None:
    x = make() * 3 + 0.5
    assert x.movedim(1, -1).is_contiguous()  # channels innermost, as the UNet's layers hold them
    weight = torch.randn(64) if affine else None
    bias = torch.randn(64) if affine else None
    expected = torch.nn.functional.group_norm(x, 8, weight, bias, 1e-5)
    torch.testing.assert_close(group_norm(x, 8, weight, bias, 1e-5), expected, atol=1e-4, rtol=1e-4)


def test_a_large_mean_does_not_cancel_the_variance() -> None:
    # Sums of squares minus a squared mean lose float32's digits when |mean| >> std;
    # per-tile deviations combined by Chan's formula do not.
    x = (torch.randn(2, 32, 24, 24) + 3000).contiguous(memory_format=torch.channels_last)
    expected = torch.nn.functional.group_norm(x.double(), 4, eps=1e-6).float()
    torch.testing.assert_close(group_norm(x, 4, None, None, 1e-6), expected, atol=1e-3, rtol=1e-3)


def test_tile_statistics_cover_a_ragged_last_tile() -> None:
    rows = torch.randn(2, TILE_POSITIONS + 7, 5)
    mean, m2 = tile_statistics(rows)
    assert mean.shape == m2.shape == (2, 2, 5)
    last = rows[:, TILE_POSITIONS:]
    torch.testing.assert_close(mean[:, 1], last.mean(1))
    torch.testing.assert_close(m2[:, 1], (last - last.mean(1, keepdim=True)).square().sum(1))


def test_video_shaped_inputs_take_the_tiles_in_any_layout() -> None:
    norm = torch.nn.GroupNorm(4, 16)
    norm.__class__ = ChannelsLastGroupNorm
    for video in (torch.randn(2, 16, 3, 5, 5), frames_first(2, 3, 16, 5, 5)):
        expected = torch.nn.functional.group_norm(video, 4, norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(norm(video), expected, atol=1e-5, rtol=1e-5)
    frames = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    expected = torch.nn.functional.group_norm(frames, 4, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(norm(frames), expected, atol=0, rtol=0)  # per-frame norms: the stock kernel


def test_inputs_that_fit_the_cache_keep_the_stock_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    video = frames_first(2, 3, 16, 5, 5)
    size = video.numel() * video.element_size()
    norm = torch.nn.GroupNorm(4, 16)
    assert use_channels_last_group_norm(norm, min_bytes=size) == 1
    tiled_calls: list[int] = []

    def counted(x: torch.Tensor, *args: object) -> torch.Tensor:
        tiled_calls.append(x.numel())
        return group_norm(x, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(group_norm_module, "group_norm", counted)
    expected = torch.nn.functional.group_norm(video, 4, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(norm(video), expected, atol=0, rtol=0)  # at the limit: the stock kernel
    assert tiled_calls == []
    fingerprint = module_fingerprint(norm)
    norm.min_bytes = size - 1
    torch.testing.assert_close(norm(video), expected, atol=1e-5, rtol=1e-5)
    assert tiled_calls == [video.numel()]
    # The limit changes the traced graph, so an AOT package built under another limit is not reused.
    assert f"min_bytes={size - 1}" in repr(norm) and module_fingerprint(norm) != fingerprint
    assert min_tiled_bytes("cpu") == 0  # off CUDA every video-shaped norm takes the reference tiles


def test_swapped_norms_render_what_stock_renders(model_cache: Path, make_request: MakeRequest,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(EngineOptions(device="cpu"), model_cache=model_cache)
    unet = engine.warm("tiny").pipeline.unet
    stock_norms = sum(type(m) is torch.nn.GroupNorm for m in unet.modules())
    convert_weights(unet)
    before = engine.render(make_request(seed=6, steps=3)).frames

    assert use_channels_last_group_norm(unet) == stock_norms > 0
    assert use_channels_last_group_norm(unet) == 0  # applying twice swaps nothing twice
    tiled_calls: list[int] = []

    def counted(x: torch.Tensor, *args: object) -> torch.Tensor:
        tiled_calls.append(x.ndim)
        return group_norm(x, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(group_norm_module, "group_norm", counted)
    after = engine.render(make_request(seed=6, steps=3)).frames
    assert tiled_calls and set(tiled_calls) == {5}  # the temporal norms took the tiles, per-frame ones not
    difference = np.abs(after.astype(int) - before.astype(int))
    assert difference.max() <= 2 and difference.mean() < 0.05  # float32 rounding, in uint8 levels


def test_the_lever_needs_cuda_and_channels_last() -> None:
    on_cpu = resolve_plan(EngineOptions(preset="fast", channels_last_group_norm=True), "cpu", "full")
    assert on_cpu.channels_last_group_norm is False
    assert "channels_last_group_norm (CUDA only: a Triton kernel)" in on_cpu.skipped
    options = EngineOptions(preset="fast", channels_last=False, channels_last_group_norm=True)
    no_layout = resolve_plan(options, "cuda", "full")
    assert no_layout.channels_last_group_norm is False
    assert any(reason.startswith("channels_last_group_norm (needs channels_last") for reason in no_layout.skipped)
