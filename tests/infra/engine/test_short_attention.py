"""The short-attention lever's routing, on a CPU: the processor goes on exactly the temporal
layers' attention modules and hands every call the kernel does not serve to the processor it
replaced, so off CUDA the video is bit-identical.

The Triton kernel itself runs only on CUDA; ``benchmarks/bench_kernels.py`` checks it against
PyTorch SDPA at the UNet's shapes (results in ``benchmarks/results/kernels-*.json``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers.models.attention_processor import Attention

from infra.engine.engine import Engine, RenderRequest
from infra.engine.loader import EngineOptions
from infra.engine.short_attention import TEMPORAL_CLASSES, ShortSequenceAttnProcessor, use_short_attention

MakeRequest = Callable[..., RenderRequest]


def test_processor_goes_on_temporal_attention_only_and_keeps_the_frames(
    model_cache: Path, make_request: MakeRequest
) -> None:
    engine = Engine(EngineOptions(device="cpu"), model_cache=model_cache)
    unet = engine.warm("tiny").pipeline.unet
    before = engine.render(make_request(seed=4)).frames
    temporal = {
        id(attn)
        for block in unet.modules() if type(block).__name__ in TEMPORAL_CLASSES
        for attn in block.modules() if isinstance(attn, Attention)
    }
    assert temporal

    assert use_short_attention(unet) == len(temporal)
    assert use_short_attention(unet) == 0  # applying twice wraps nothing twice
    routed = {id(m) for m in unet.modules() if isinstance(m, Attention)
              and isinstance(m.processor, ShortSequenceAttnProcessor)}
    assert routed == temporal
    np.testing.assert_array_equal(engine.render(make_request(seed=4)).frames, before)


def test_serves_only_what_the_kernel_computes() -> None:
    attn = Attention(query_dim=64, heads=1, dim_head=64)
    processor = ShortSequenceAttnProcessor(attn.processor)
    short = torch.randn(2, 16, 64, dtype=torch.float16)
    assert not processor.serves(attn, short, None, None)  # not CUDA
    calls: list[int] = []

    def fallback(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return torch.zeros(1)

    ShortSequenceAttnProcessor(fallback)(attn, short)
    assert calls == [1]
