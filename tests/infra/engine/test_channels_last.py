"""The ``channels_last`` lever on a CPU: weights converted, every ResNet block's input made
channels-last (eagerly by a copy only where needed; in a traced graph by inductor's stride-order
primitive, in every graph), the same frames as without it, and a package key that follows it.

The layout's effect on speed shows only on a GPU: ``docs/performance.md`` has the profile.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers.models.resnet import ResnetBlock2D

from infra.engine.aot import module_fingerprint
from infra.engine.channels_last import (
    ChannelsLastInput,
    force_channels_last,
    use_channels_last_resnet_inputs,
)
from infra.engine.engine import Engine, RenderRequest
from infra.engine.loader import EngineOptions

MakeRequest = Callable[..., RenderRequest]
FORCE_STRIDE = "prims.inductor_force_stride_order.default"


def resnet_and_inputs() -> tuple[ResnetBlock2D, torch.Tensor, torch.Tensor]:
    """A small ResNet block and an NCHW input, as an up block's concatenation is traced."""
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=16, out_channels=8, temb_channels=12, groups=4).eval()
    skip = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    upsampled = torch.randn(2, 8, 6, 6)
    return block, torch.cat([upsampled, skip], dim=1), torch.randn(2, 12)


def test_force_channels_last_copies_only_what_is_not_channels_last() -> None:
    nchw = torch.randn(2, 6, 5, 7)
    stored = force_channels_last(nchw)
    assert stored.is_contiguous(memory_format=torch.channels_last) and torch.equal(stored, nchw)
    assert force_channels_last(stored) is stored  # already channels-last: no copy
    video = torch.randn(1, 6, 3, 5, 7)
    assert force_channels_last(video) is video  # only the 4-D inputs of 2-D ResNet blocks


def test_swapped_blocks_see_channels_last_inputs_and_compute_the_same() -> None:
    block, hidden, temb = resnet_and_inputs()
    with torch.no_grad():
        expected = block(hidden, temb)
        fingerprint = module_fingerprint(block)
        seen: list[bool] = []
        block.norm1.register_forward_pre_hook(
            lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))

        assert use_channels_last_resnet_inputs(block) == 1
        assert use_channels_last_resnet_inputs(block) == 0  # applying twice swaps nothing twice
        assert type(block).__name__ == "ResnetBlock2D"  # the regional compile finds blocks by name
        torch.testing.assert_close(block(hidden, temb), expected, atol=1e-5, rtol=1e-5)  # layout: sum order
    assert seen == [True]
    # The lever changes the traced graph, so a package built without it is never reused.
    assert "channels_last_input=True" in repr(block) and module_fingerprint(block) != fingerprint


def test_traced_blocks_carry_the_stride_order_into_the_graph_and_the_package(tmp_path: Path) -> None:
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    block, hidden, temb = resnet_and_inputs()
    use_channels_last_resnet_inputs(block)
    with torch.no_grad():
        expected = block(hidden, temb)
        exported = torch.export.export(block, (hidden, temb))
        # Traced, the block always goes through the primitive: eager's strides do not say which layout
        # inductor would give the input.
        assert [str(n.target) for n in exported.graph.nodes].count(FORCE_STRIDE) == 1
        package = aoti_compile_and_package(exported, package_path=str(tmp_path / "resnet.pt2"))
        torch.testing.assert_close(aoti_load_package(package)(hidden, temb), expected, atol=1e-5, rtol=1e-5)
        compiled = torch.compile(block)
        torch.testing.assert_close(compiled(hidden, temb), expected, atol=1e-5, rtol=1e-5)


def test_an_engine_with_the_lever_renders_through_its_package_what_stock_renders(
    model_cache: Path, engine: Engine, make_request: MakeRequest, tmp_path: Path,
) -> None:
    options = EngineOptions(device="cpu", compile="default", aot=True, channels_last=True, channels_last_inputs=True,
                            compile_cache_dir=str(tmp_path / "compile-cache"))
    levered = Engine(options, model_cache=model_cache)
    result = levered.render(make_request(seed=4))
    unet = levered.warm("tiny").pipeline.unet

    assert result.speed["channels_last_inputs"] is True and result.speed["aot_fallbacks"] == []
    blocks = [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]
    assert blocks and all(isinstance(m, ChannelsLastInput) for m in blocks)
    stock = engine.render(make_request(seed=4)).frames
    relative = np.linalg.norm(result.frames.astype(float) - stock) / np.linalg.norm(stock.astype(float))
    assert relative < 1e-3, relative
