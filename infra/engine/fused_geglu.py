"""The ``fused_geglu`` lever: each transformer feed-forward's GEGLU as one Triton kernel.

Why: diffusers' ``GEGLU`` projects to twice the feed-forward width and then reads that back to
multiply one half by the GELU of the other. At 512x512x16 the top level's projection is a
131072 x 2560 fp16 tensor (671 MB) written by the matmul and read again by a pointwise kernel,
20 times per step: 0.25 s of pointwise kernels per video in the profile of ``fast``
(docs/performance.md). The kernel in ``triton_kernels.py`` computes both halves of each output
tile in registers and writes only the product, so that tensor never exists. The math is the
same (exact GELU); the product is rounded to fp16 once instead of after each half.

``FusedGEGLU`` takes over exactly the calls the kernel serves (CUDA, fp16/bf16, a plain
``nn.Linear`` projection, widths the kernel tiles without masks) and runs diffusers' own
``GEGLU.forward`` for every other call, so off CUDA the output is bit-identical.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.activations import GEGLU

# Mirrors triton_kernels.GEGLU_*_MULTIPLE (not imported: that module needs Triton, this one must not).
FAN_IN_MULTIPLE, WIDTH_MULTIPLE = 64, 128


class FusedGEGLU(GEGLU):
    """``GEGLU`` whose projection and gating run as one kernel where the kernel serves the call."""

    def serves(self, hidden_states: torch.Tensor) -> bool:
        """Whether the kernel computes exactly this call's math."""
        proj = self.proj
        if not hidden_states.is_cuda or hidden_states.dtype not in (torch.float16, torch.bfloat16):
            return False
        if type(proj) is not torch.nn.Linear or proj.weight.dtype != hidden_states.dtype:
            return False
        if not proj.weight.is_contiguous() or hidden_states.stride(-1) != 1:
            return False
        return proj.in_features % FAN_IN_MULTIPLE == 0 and (proj.out_features // 2) % WIDTH_MULTIPLE == 0

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.serves(hidden_states):
            return super().forward(hidden_states, *args, **kwargs)
        from infra.engine.triton_kernels import geglu_linear

        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        out = geglu_linear(rows, self.proj.weight, self.proj.bias)
        return out.reshape(*hidden_states.shape[:-1], out.shape[-1])


def use_fused_geglu(unet: torch.nn.Module) -> int:
    """Turn every plain ``GEGLU`` of ``unet`` into a ``FusedGEGLU`` (same parameters); return how many.

    The class changes in place, so parameter names, devices and layouts stay as they are, and
    the module's ``repr`` (part of the AOT packages' key) names the new class.
    """
    count = 0
    for module in unet.modules():
        if type(module) is GEGLU:
            module.__class__ = FusedGEGLU
            count += 1
    return count
