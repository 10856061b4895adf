"""The ``channels_last_group_norm`` lever: GroupNorm statistics read in the layout the tensor has.

Why: with channels-last activations (the ``channels_last`` lever) one GroupNorm group is 10-40
channels out of 320-1280 at every pixel. Inductor's GroupNorm reduces over (channel, pixel) in
NCHW order, so consecutive loads sit a whole pixel (640-2560 bytes) apart and each cache line
is fetched again for every channel of the group. Profiled on an H200 (docs/performance.md), the
UNet's norm kernels took 0.35 s of a 5.6 s render at 512x16 but 4.8 s of 23 s at 768x24, where
a group no longer fits in the L2 cache between those re-reads.

Here the statistics come from [pixels x channels] tiles read contiguously: 1. per tile and
channel, a mean and a sum of squared deviations (one Triton kernel on CUDA, plain torch
elsewhere); 2. those combined per group (Chan's parallel formula, a few small torch ops);
3. the normalisation per channel in plain torch, which inductor fuses with
what follows (SiLU, the next convolution's layout). Same math as ``torch.nn.GroupNorm``, in
float32, to fp16 rounding.

Only where it pays: a norm whose input fits the L2 cache keeps inductor's reduction, since the
re-reads then hit the cache. Measured per temporal norm (``bench_kernels``, GroupNorm + SiLU, both
compiled): 141-566 MB inputs (768x24) 2.5-5.6x on an H100 and an H200; 71 MB (768x24's
1280-channel norms) 2.3x and 84 MB (512x16) 3.5x on an H100 (50 MiB L2), 0.96x on an H200;
42 MB 0.99-1.01x. Whole renders in AOT packages on an H100: 768x24 1.43x -> 1.65x stock with the
tiles above two L2 caches, then 1.020-1.027x faster again with the limit at one (the 1280-channel
norms join; each A/B in one process, in two processes); at 512x16 neither limit changed the
render (5.98 vs 6.00 s) or its peak.
"""

from __future__ import annotations

import importlib.util

import torch

TILE_POSITIONS = 256  # pixels per tile; the kernel's block and the reference's tile agree
L2_MULTIPLE = 1  # inputs larger than this many L2 caches take the tiles (H100: over 50 MiB)


def unsupported_reason(device: str) -> str | None:
    """Why the statistics kernel cannot run on ``device`` (None: it can)."""
    if not device.startswith("cuda"):
        return "CUDA only: a Triton kernel"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    return None


def min_tiled_bytes(device: str | torch.device) -> int:
    """The input size, in bytes, above which a temporal norm on ``device`` takes the tiles.

    ``L2_MULTIPLE`` times the GPU's L2 cache (H100: 50 MiB); 0 off CUDA, where the lever serves
    the tests' reference path.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    return L2_MULTIPLE * torch.cuda.get_device_properties(device).L2_cache_size


def tile_statistics(rows: torch.Tensor, tile: int = TILE_POSITIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile of ``tile`` positions and per channel: mean and sum of squared deviations.

    ``rows`` is (N, positions, C), contiguous; returns two float32 (N, tiles, C) tensors. This
    is the reference the CUDA kernel (``triton_kernels.channel_tile_stats``) is measured against.
    """
    samples, positions, channels = rows.shape
    tiles = -(-positions // tile)
    padded = torch.nn.functional.pad(rows.float(), (0, 0, 0, tiles * tile - positions))
    padded = padded.view(samples, tiles, tile, channels)
    counts = _tile_counts(positions, tiles, tile, rows.device)
    mean = padded.sum(2) / counts.view(1, tiles, 1)
    valid = torch.arange(tiles * tile, device=rows.device).view(1, tiles, tile, 1) < positions
    deviations = torch.where(valid, padded - mean.unsqueeze(2), 0.0)
    return mean, deviations.square().sum(2)


def _tile_counts(positions: int, tiles: int, tile: int, device: torch.device) -> torch.Tensor:
    starts = torch.arange(tiles, device=device) * tile
    return (positions - starts).clamp(max=tile).float()


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """``torch.nn.functional.group_norm`` with statistics by tiles; fastest for a channels-last ``x``."""
    samples, channels = x.shape[:2]
    rows = x.movedim(1, -1).reshape(samples, -1, channels)
    # 1. per-tile statistics, read along the memory
    if x.is_cuda:
        from infra.engine.triton_kernels import channel_tile_stats

        tile_mean, tile_m2 = channel_tile_stats(rows, TILE_POSITIONS)
    else:
        tile_mean, tile_m2 = tile_statistics(rows)
    # 2. combined per group: tiles x channels of the group are the parts of one reduction
    tiles = tile_mean.shape[1]
    counts = _tile_counts(rows.shape[1], tiles, TILE_POSITIONS, x.device).view(1, tiles, 1, 1)
    tile_mean = tile_mean.view(samples, tiles, groups, channels // groups)
    tile_m2 = tile_m2.view(samples, tiles, groups, channels // groups)
    total = rows.shape[1] * (channels // groups)
    mean = (tile_mean * counts).sum((1, 3)) / total
    spread = (tile_mean - mean.view(samples, 1, groups, 1)).square() * counts
    rstd = torch.rsqrt((tile_m2.sum((1, 3)) + spread.sum((1, 3))) / total + eps)
    # 3. normalise per channel, (x - mean) * scale + bias, left to the compiler to fuse
    broadcast = (samples, channels) + (1,) * (x.ndim - 2)
    mean = mean.repeat_interleave(channels // groups, dim=1).view(broadcast)
    scale = rstd.repeat_interleave(channels // groups, dim=1)
    if weight is not None:
        scale = scale * weight.float()
    out = (x.float() - mean) * scale.view(broadcast)
    if bias is not None:
        out = out + bias.float().view(broadcast[1:])
    return out.to(x.dtype)


class ChannelsLastGroupNorm(torch.nn.GroupNorm):
    """``nn.GroupNorm`` whose video-shaped (N, C, frames, H, W) inputs take ``group_norm`` above.

    Those are the temporal layers' norms, one group over all frames of a video, where inductor's
    own reduction is slow (2.3-5.6x slower than the tiles above the L2 cache, ``bench_kernels``). They are
    made channels-last-3d first: a no-op for the temporal convolutions' input, and for the
    temporal transformers' (an add of channels-last tensors, traced as NCHW) it lets inductor
    write the add's result in the layout it keeps anyway. Per-frame (4D) norms, and inputs of
    ``min_bytes`` or less (they stay in the L2 cache), stay on ``nn.GroupNorm``'s path: inductor
    handles those as fast as the tiles or faster. Shapes are fixed per compiled graph, so the
    choice is made once, when the graph is traced.
    """

    min_bytes: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = x.numel() * x.element_size() <= self.min_bytes
        if x.ndim != 5 or x.shape[1] % self.num_groups or small:
            return super().forward(x)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        # In the repr, so an AOT package's fingerprint (``aot.module_fingerprint``) follows it.
        return f"{super().extra_repr()}, min_bytes={self.min_bytes}"


def use_channels_last_group_norm(model: torch.nn.Module, min_bytes: int = 0) -> int:
    """Give every ``nn.GroupNorm`` in ``model`` the tiled statistics for inputs over ``min_bytes``.

    Returns how many norms were swapped. The class is swapped in place (weights, hooks and names
    stay), because diffusers builds its norms as plain ``nn.GroupNorm`` modules and has no
    processor API for them.
    """
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.GroupNorm:
            module.__class__ = ChannelsLastGroupNorm
            module.min_bytes = min_bytes
            count += 1
    return count
