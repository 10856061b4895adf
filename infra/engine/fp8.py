"""The ``fp8_linear`` lever: the UNet transformers' Linear layers as fp8 matmuls (Hopper+).

Why: half of a UNet step's FLOPs are Linear layers (attention projections and feed-forward),
already near the fp16 tensor-core ceiling; Hopper runs e4m3 matmuls at twice that rate.
Weights are quantised once, per output channel; activations per row at run time (under
``torch.compile`` that scaling fuses into the layer norm or GELU before it). It changes the
numbers (3 mantissa bits per value, rescaled per row), so it is opt-in and the benchmark
reports the drift against stock.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
TRANSFORMER_CLASSES = ("Transformer2DModel", "TransformerTemporalModel")


def fp8_supported(device: str) -> bool:
    """fp8 tensor-core matmuls need compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(torch.device(device)) >= (8, 9)


def _rowwise(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise each row of a 2-D tensor to e4m3 with its own float32 scale."""
    scale = tensor.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (tensor.float() / scale).to(FP8), scale


class Fp8Linear(torch.nn.Module):
    """A ``Linear`` whose matmul runs in e4m3 with row-wise scales; bias added in fp16/bf16."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight, scale = _rowwise(linear.weight.detach())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_fp8", weight)  # (out, in), row-major: column-major as .t()
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out)
        self.bias = linear.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, self.in_features)
        quantised, scale = _rowwise(rows)
        out = torch._scaled_mm(quantised, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale,
                               out_dtype=torch.bfloat16).to(hidden.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*hidden.shape[:-1], self.out_features)


def use_fp8_linears(unet: torch.nn.Module) -> int:
    """Swap the Linear layers inside the UNet's transformers for ``Fp8Linear``; count them.

    Only layers whose sizes fit the fp8 matmul (multiples of 16) are swapped. Call after
    ``fuse_qkv_projections``, which builds new fused Linear layers.
    """
    swapped = 0
    for block in unet.modules():
        if type(block).__name__ not in TRANSFORMER_CLASSES:
            continue
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                    setattr(parent, name, Fp8Linear(child))
                    swapped += 1
    return swapped
