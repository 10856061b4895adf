"""Triton kernels of the engine's speed levers (CUDA only; imported lazily by ``speed.py``).

Why a kernel of our own: the temporal layers of I2VGen-XL attend over one token per frame
(16 or 24 tokens) for every latent pixel, so at 512x512 one call is 8,192 x 5 heads of a
16x16 attention. A general flash-attention kernel pads each of those to its 64- or 128-row
tile and runs the tile's full pipeline for a few kilobytes of work; here one small program
loads a head's Q, K and V whole, does both matmuls in registers and writes the output once.
It is bandwidth-bound by design: Q, K, V read once, O written once.

``geglu_linear`` is the feed-forward's GEGLU (``value * gelu(gate)`` of one projection) as one
matmul kernel with two accumulators, so the projection's output (twice the feed-forward width)
is never written to memory; see ``fused_geglu.py``.

Both are ``torch.library`` Triton ops, so ``torch.compile`` and AOTInductor see into them.
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


# Hopper-sized tiles first; autotuning picks one per (rows, width, fan-in) at compile time.
_GEGLU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=stages, num_warps=warps)
    for bm, bn, stages, warps in ((128, 128, 3, 8), (128, 128, 4, 8), (128, 64, 4, 4), (64, 128, 4, 4),
                                  (256, 64, 3, 8), (128, 64, 3, 8))
]


@triton.autotune(configs=_GEGLU_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _geglu_linear_kernel(
    x_ptr, w_ptr, b_ptr, o_ptr, M, N, K,
    x_stride_m, w_stride_n, o_stride_m,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Programs walk the output in groups of GROUP_M row blocks so neighbours share weight tiles in L2.
    program = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = program // (GROUP_M * blocks_n)
    first_m = group * GROUP_M
    group_rows = min(blocks_m - first_m, GROUP_M)
    block_m = first_m + (program % (GROUP_M * blocks_n)) % group_rows
    block_n = (program % (GROUP_M * blocks_n)) // group_rows

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inner = tl.arange(0, BLOCK_K)
    # Rows past M read row M-1 again (no mask in the loop); the store below drops them.
    safe_rows = tl.minimum(rows, M - 1).to(tl.int64)
    x_ptrs = x_ptr + safe_rows[:, None] * x_stride_m + inner[None, :]
    value_ptrs = w_ptr + cols[None, :].to(tl.int64) * w_stride_n + inner[:, None]
    gate_ptrs = value_ptrs + N * w_stride_n
    value = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, tl.cdiv(K, BLOCK_K)):  # the caller guarantees K % BLOCK_K == 0 and N % BLOCK_N == 0
        x = tl.load(x_ptrs)
        value = tl.dot(x, tl.load(value_ptrs), value)
        gate = tl.dot(x, tl.load(gate_ptrs), gate)
        x_ptrs += BLOCK_K
        value_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
    if HAS_BIAS:
        value += tl.load(b_ptr + cols)[None, :].to(tl.float32)
        gate += tl.load(b_ptr + N + cols)[None, :].to(tl.float32)
    out = value * (0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)))  # exact (erf) GELU
    o_ptrs = o_ptr + rows[:, None].to(tl.int64) * o_stride_m + cols[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(rows < M)[:, None])


@triton_op("i2vflow::geglu_linear", mutates_args=())
def geglu_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``value * gelu(gate)`` of ``hidden @ weight.T + bias`` split in halves, in one kernel.

    ``hidden`` is ``(rows, fan_in)`` with a unit last stride, ``weight`` ``(2 * width, fan_in)``
    contiguous (an ``nn.Linear``'s); the ``(rows, 2 * width)`` projection is never written out.
    No masks in the loop: ``fan_in`` must be a multiple of 64 and ``width`` of 128
    (``fused_geglu.FusedGEGLU.serves`` checks).
    """
    rows, fan_in = hidden.shape
    width = weight.shape[0] // 2
    out = torch.empty((rows, width), dtype=hidden.dtype, device=hidden.device)

    def grid(meta: dict[str, int]) -> tuple[int]:
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(width, meta["BLOCK_N"]),)

    wrap_triton(_geglu_linear_kernel)[grid](
        hidden, weight, weight if bias is None else bias, out, rows, width, fan_in,
        hidden.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
    )
    return out
