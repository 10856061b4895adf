"""Triton kernels of the engine's speed levers (CUDA only; imported lazily by ``speed.py``).

Why a kernel of our own: the temporal layers of I2VGen-XL attend over one token per frame
(16 or 24 tokens) for every latent pixel, so at 512x512 one call is 8,192 x 5 heads of a
16x16 attention. A general flash-attention kernel pads each of those to its 64- or 128-row
tile and runs the tile's full pipeline for a few kilobytes of work; here one small program
loads a head's Q, K and V whole, does both matmuls in registers and writes the output once.
It is bandwidth-bound by design: Q, K, V read once, O written once.

``short_attention`` and ``channel_tile_stats`` are ``torch.library`` Triton ops, so
``torch.compile`` (and AOTInductor) sees into them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


@triton.jit
def _short_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    q_stride_b, q_stride_s, k_stride_b, k_stride_s, v_stride_b, v_stride_s, o_stride_b, o_stride_s,
    tokens, heads, scale,
    HEAD_DIM: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
):
    program = tl.program_id(0)
    batch = (program // heads).to(tl.int64)
    head = program % heads
    rows = tl.arange(0, BLOCK_TOKENS)
    cols = head * HEAD_DIM + tl.arange(0, HEAD_DIM)
    valid = rows < tokens
    q = tl.load(q_ptr + batch * q_stride_b + rows[:, None] * q_stride_s + cols[None, :],
                mask=valid[:, None], other=0.0)
    k = tl.load(k_ptr + batch * k_stride_b + rows[:, None] * k_stride_s + cols[None, :],
                mask=valid[:, None], other=0.0)
    v = tl.load(v_ptr + batch * v_stride_b + rows[:, None] * v_stride_s + cols[None, :],
                mask=valid[:, None], other=0.0)
    scores = tl.dot(q, tl.trans(k)) * scale
    scores = tl.where(valid[None, :], scores, float("-inf"))
    weights = tl.exp(scores - tl.max(scores, 1)[:, None])
    weights = weights / tl.sum(weights, 1)[:, None]
    out = tl.dot(weights.to(v.dtype), v)
    tl.store(o_ptr + batch * o_stride_b + rows[:, None] * o_stride_s + cols[None, :],
             out.to(o_ptr.dtype.element_ty), mask=valid[:, None])


@triton_op("i2vflow::short_attention", mutates_args=())
def short_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int,
                    scale: float) -> torch.Tensor:
    """Softmax attention of ``(batch, tokens, heads * head_dim)`` inputs, no mask, few tokens.

    Inputs may be strided views (the split of a fused QKV projection) with a unit last stride;
    the output is contiguous, in the same layout (heads side by side in the last dimension).
    """
    batch, tokens, width = query.shape
    head_dim = width // heads
    out = torch.empty((batch, tokens, width), dtype=query.dtype, device=query.device)
    block_tokens = max(16, triton.next_power_of_2(tokens))
    wrap_triton(_short_attention_kernel)[(batch * heads,)](
        query, key, value, out,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), out.stride(0), out.stride(1),
        tokens, heads, scale,
        HEAD_DIM=head_dim, BLOCK_TOKENS=block_tokens, num_warps=2,
    )
    return out


@triton.jit
def _channel_tile_stats_kernel(
    x_ptr, mean_ptr, m2_ptr, positions, channels, tiles,
    BLOCK_POSITIONS: tl.constexpr, BLOCK_CHANNELS: tl.constexpr,
):
    sample = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    rows = tile * BLOCK_POSITIONS + tl.arange(0, BLOCK_POSITIONS)
    cols = tl.program_id(2) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
    row_ok = rows < positions
    col_ok = cols < channels
    valid = row_ok[:, None] & col_ok[None, :]
    offsets = (sample * positions + rows[:, None].to(tl.int64)) * channels + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    count = tl.minimum(positions - tile * BLOCK_POSITIONS, BLOCK_POSITIONS).to(tl.float32)
    mean = tl.sum(x, 0) / count
    deviations = tl.where(valid, x - mean[None, :], 0.0)
    out = (sample * tiles + tile) * channels + cols
    tl.store(mean_ptr + out, mean, mask=col_ok)
    tl.store(m2_ptr + out, tl.sum(deviations * deviations, 0), mask=col_ok)


@triton_op("i2vflow::channel_tile_stats", mutates_args=())
def channel_tile_stats(rows: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per ``tile`` positions and channel of ``(N, positions, C)`` rows: mean and squared deviations.

    Why a kernel: each program reads a [positions x channels] block along the memory of a
    channels-last tensor, so every byte is read once (see ``group_norm.py``). Float32 outputs of
    shape (N, tiles, C); ``group_norm.tile_statistics`` is the same computation in torch.
    """
    rows = rows.contiguous()
    samples, positions, channels = rows.shape
    tiles = triton.cdiv(positions, tile)
    mean = torch.empty((samples, tiles, channels), dtype=torch.float32, device=rows.device)
    m2 = torch.empty_like(mean)
    block_channels = 64
    wrap_triton(_channel_tile_stats_kernel)[(samples, tiles, triton.cdiv(channels, block_channels))](
        rows, mean, m2, positions, channels, tiles,
        BLOCK_POSITIONS=tile, BLOCK_CHANNELS=block_channels, num_warps=8,
    )
    return mean, m2
