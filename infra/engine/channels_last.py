"""The ``channels_last`` lever: convolution weights and ResNet block inputs in channels-last layout.

Why: cuDNN's fastest convolutions on these shapes read and write channels-last (NHWC) memory.
Converting the weights makes every convolution ask for channels-last activations, and inductor
(with ``force_layout_optimization``) keeps most of them that way inside a compiled graph.

One place it does not: the input of an up block's ResNet is the concatenation of the upsampled
features and the skip connection, and inductor leaves that tensor's layout free and stores it
NCHW. The fused GroupNorm + SiLU before the block's first convolution then reads it across the
grain, one whole pixel row apart per load, and writes a second, channels-last copy for the
block's shortcut convolution. Profiled at 768x24 on an H100 (docs/performance.md), those eight
kernels took 0.56 s of 22.5 s at 0.7-0.9 TB/s, a quarter of the copy bandwidth. With the
``channels_last_inputs`` setting each ResNet block takes its input through
``prims.inductor_force_stride_order``: inductor's own primitive for a stride order, which realizes
the concatenation channels-last in the first place (no copy); eager, it is
``contiguous(memory_format=torch.channels_last)``, a copy only where needed. That setting is off in
every preset until a GPU has timed it: the block's GroupNorm statistics then read channels-last
memory, which inductor reduces less well than NCHW, so the net gain is a measurement, not a sum.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

RESNET_CLASS = "ResnetBlock2D"


def convert_weights(module: torch.nn.Module) -> int:
    """Convolution weights to channels-last (2D) / channels-last-3d (3D); count converted.

    ``module.to(memory_format=...)`` cannot do it: the UNet mixes rank-4 and rank-5 weights.
    """
    converted = 0
    for sub in module.modules():
        weight = getattr(sub, "weight", None)
        if not isinstance(sub, torch.nn.Conv2d | torch.nn.Conv3d) or weight is None:
            continue
        fmt = torch.channels_last if weight.dim() == 4 else torch.channels_last_3d
        weight.data = weight.data.contiguous(memory_format=fmt)
        converted += 1
    return converted


def channels_last_strides(shape: torch.Size) -> list[int]:
    """The strides of a contiguous channels-last (N, C, H, W) tensor of ``shape``."""
    _, channels, height, width = shape
    return [height * width * channels, 1, width * channels, channels]


def force_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` stored channels-last; a 4-D tensor already so (or any other rank) is returned as is."""
    if x.dim() != 4:
        return x
    if not torch.compiler.is_compiling():
        return x.contiguous(memory_format=torch.channels_last)
    # Traced: always the primitive, because the traced tensor's strides are eager's, not the
    # layout inductor would pick for it.
    from torch._inductor import inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)

    return torch.ops.prims.inductor_force_stride_order(x, channels_last_strides(x.shape))


class ChannelsLastInput:
    """Mixin for a block whose first argument is made channels-last before its own ``forward``."""

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return super().forward(force_channels_last(hidden), *args, **kwargs)  # type: ignore[misc]

    def extra_repr(self) -> str:
        # In the repr, so an AOT package's key (``aot.module_fingerprint``) follows the lever.
        return ", ".join(filter(None, [super().extra_repr(), "channels_last_input=True"]))  # type: ignore[misc]


@functools.cache
def _with_channels_last_input(cls: type) -> type:
    # Same class name: the regional compile and the tests find blocks by it.
    return type(cls.__name__, (ChannelsLastInput, cls), {"__module__": cls.__module__})


def use_channels_last_resnet_inputs(model: torch.nn.Module) -> int:
    """Make every ResNet block of ``model`` take its input channels-last; count the blocks.

    The class is swapped in place (weights, hooks and names stay), as diffusers gives a block no
    hook for its input's layout.
    """
    count = 0
    for module in model.modules():
        if type(module).__name__ == RESNET_CLASS and not isinstance(module, ChannelsLastInput):
            module.__class__ = _with_channels_last_input(type(module))
            count += 1
    return count
