"""The ``short_attention`` lever: the UNet's temporal self-attention through a Triton kernel.

Why: I2VGen-XL's temporal layers attend over one token per frame (16-24 tokens) for every
latent pixel; general flash-attention kernels spend most of each call on padding for such
short sequences (see ``triton_kernels.py``). The processor here takes over exactly the calls
the kernel serves (CUDA, self-attention, no mask or norms, at most ``MAX_TOKENS`` tokens, a
head size the kernel knows) and hands every other call to the module's previous processor,
so the output is the same math, equal to fp16 rounding (``benchmarks/bench_kernels.py``).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

MAX_TOKENS = 64
HEAD_DIMS = (16, 32, 64, 128)
TEMPORAL_CLASSES = ("TransformerTemporalModel", "I2VGenXLTransformerTemporalEncoder")


def unsupported_reason(device: str) -> str | None:
    """Why the kernel cannot run on ``device`` (None: it can).

    Triton's tensor-core ``tl.dot`` path is what this kernel was built and measured on:
    Ampere (compute capability 8.0) or newer, with Triton installed (it ships with CUDA torch
    on Linux, not everywhere).
    """
    if not device.startswith("cuda"):
        return "CUDA only: a Triton kernel"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if major < 8:
        return f"needs compute capability 8.0 or newer, this GPU has {major}.{minor}"
    return None


class ShortSequenceAttnProcessor:
    """Attention processor: Triton kernel for short self-attention, ``fallback`` otherwise."""

    def __init__(self, fallback: Any) -> None:
        self.fallback = fallback

    def serves(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any,
               attention_mask: Any) -> bool:
        """Whether the kernel computes exactly what the fallback would for this call."""
        if not hidden_states.is_cuda or hidden_states.ndim != 3 or hidden_states.shape[1] > MAX_TOKENS:
            return False
        if hidden_states.dtype not in (torch.float16, torch.bfloat16):
            return False
        if encoder_hidden_states is not None or attention_mask is not None:
            return False
        if any(getattr(attn, name, None) is not None for name in ("spatial_norm", "group_norm", "norm_q", "norm_k")):
            return False
        width = attn.inner_dim
        return width % attn.heads == 0 and width // attn.heads in HEAD_DIMS

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.serves(attn, hidden_states, encoder_hidden_states, attention_mask):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        from infra.engine.triton_kernels import short_attention

        residual = hidden_states
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # The diffusers processors leave SDPA's default scale (1/sqrt(head_dim)); so do we.
        head_dim = attn.inner_dim // attn.heads
        hidden_states = short_attention(query, key, value, attn.heads, head_dim**-0.5)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def use_short_attention(unet: torch.nn.Module) -> int:
    """Give every attention module of the temporal layers the short-sequence processor.

    Call after ``fuse_qkv_projections`` (which replaces processors). Returns how many modules
    now use it; the previous processor of each stays as its fallback.
    """
    from diffusers.models.attention_processor import Attention

    count = 0
    for module in unet.modules():
        if type(module).__name__ not in TEMPORAL_CLASSES:
            continue
        for attn in module.modules():
            if isinstance(attn, Attention) and not isinstance(attn.processor, ShortSequenceAttnProcessor):
                attn.set_processor(ShortSequenceAttnProcessor(attn.processor))
                count += 1
    return count
