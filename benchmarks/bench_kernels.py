"""Kernel-level check of four engine levers at the UNet's own shapes: error and speed.

Why: ``bench_engine`` says what a lever does to a whole video; this says why, one layer at a
time, and validates the numerics before a long run:

- ``short_attention`` (Triton) against PyTorch SDPA on the temporal layers' shapes
  (batch = 2 x latent pixels, tokens = frames, heads x 64): max abs error, time ratio;
- ``Fp8Linear`` against the fp16 ``Linear`` (both under ``torch.compile``, as the engine
  runs them) on the transformers' matmul shapes: relative error, time ratio;
- ``channels_last_group_norm`` (tiled statistics, Triton on CUDA) against ``F.group_norm``, each
  followed by SiLU under ``torch.compile`` as in the UNet, on channels-last inputs of the ResNet
  and temporal layers: max abs error, time ratio, and the kernel's statistics against torch's;
- ``channels_last_inputs`` on an up block's first ResNet (upsampled features concatenated with the
  skip connection, the concatenation's layout left to inductor), compiled with and without it:
  max abs error, time ratio.

Timings are CUDA-event medians after warm-up, as ratios against the baseline measured in the
same process. On a CPU (the test suite) it runs the fp8 numerics at small shapes and reports the
CUDA-only kernel as skipped.

``--rows`` measures some levers only (a device call is short) and updates those in the GPU's
report, keeping the others as they were measured.

    python -m benchmarks.bench_kernels [--device cuda] [--out benchmarks/results] [--rows channels_last_inputs]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from infra.engine.fp8 import Fp8Linear

RESULTS_DIR = Path(__file__).parent / "results"
# (label, batch, tokens, heads): temporal attention of a 512x512x16 render per UNet level,
# then 768x768x24 at the top level.
ATTENTION_SHAPES = [("512x16 64x64", 8192, 16, 5), ("512x16 32x32", 2048, 16, 10),
                    ("512x16 16x16", 512, 16, 20), ("512x16 8x8", 128, 16, 20),
                    ("768x24 96x96", 18432, 24, 5)]
# (label, rows, in, out): fused QKV, GEGLU in, feed-forward out at the top two levels.
LINEAR_SHAPES = [("qkv 64x64", 131072, 320, 960), ("geglu 64x64", 131072, 320, 2560),
                 ("ff-out 64x64", 131072, 1280, 320), ("qkv 32x32", 32768, 640, 1920),
                 ("geglu 32x32", 32768, 640, 5120), ("ff-out 32x32", 32768, 2560, 640)]
CPU_LINEAR_SHAPES = [("small", 256, 64, 128)]
# (label, batch, frames, channels, side, per_frame): per_frame norms are the ResNets' (one
# group per frame), the others the temporal layers' (one group over all frames of a video).
GROUP_NORM_SHAPES = [("512x16 resnet 64x64", 2, 16, 320, 64, True), ("512x16 temporal 64x64", 2, 16, 320, 64, False),
                     ("512x16 temporal 32x32", 2, 16, 640, 32, False),
                     ("768x24 resnet 96x96", 2, 24, 320, 96, True), ("768x24 temporal 96x96", 2, 24, 320, 96, False),
                     ("768x24 temporal up 96x96", 2, 24, 640, 96, False),
                     ("768x24 temporal 48x48", 2, 24, 640, 48, False),
                     ("768x24 temporal 24x24", 2, 24, 1280, 24, False)]  # 71 MB: under the tiles' limit
CPU_GROUP_NORM_SHAPES = [("small temporal", 1, 3, 64, 12, False)]
# (label, batch x frames, previous level's channels, skip channels, out channels, side): the first
# ResNet of the up blocks whose fused GroupNorm + SiLU read the concatenation across the grain.
UP_BLOCK_SHAPES = [("512x16 up 3", 32, 640, 320, 320, 64), ("768x24 up 3", 48, 640, 320, 320, 96),
                   ("768x24 up 2", 48, 1280, 640, 640, 48)]
CPU_UP_BLOCK_SHAPES = [("small", 2, 64, 32, 32, 16)]
TIME_EMBEDDING = 1280


def timed(fn: Callable[[], Any], device: str, repeats: int = 20) -> float:
    """Median milliseconds of ``fn`` after warm-up (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - began) * 1000)
    return statistics.median(samples)


def attention_rows(device: str) -> list[dict[str, Any]]:
    """Triton short attention against SDPA, inputs as the fused QKV split hands them over."""
    if not device.startswith("cuda"):
        return [{"skipped": "short_attention is a CUDA kernel"}]
    from infra.engine.triton_kernels import short_attention

    rows = []
    for label, batch, tokens, heads in ATTENTION_SHAPES:
        width = heads * 64
        qkv = torch.randn(batch, tokens, 3 * width, device=device, dtype=torch.float16)
        query, key, value = qkv.chunk(3, dim=-1)

        def sdpa(q: torch.Tensor = query, k: torch.Tensor = key, v: torch.Tensor = value,
                 n: int = heads) -> torch.Tensor:
            split = [t.view(t.shape[0], t.shape[1], n, -1).transpose(1, 2) for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*split)
            return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)

        def kernel(q: torch.Tensor = query, k: torch.Tensor = key, v: torch.Tensor = value,
                   n: int = heads) -> torch.Tensor:
            return short_attention(q, k, v, n, 64**-0.5)

        error = (kernel().float() - sdpa().float()).abs().max().item()
        sdpa_ms, kernel_ms = timed(sdpa, device), timed(kernel, device)
        rows.append({"shape": label, "batch": batch, "tokens": tokens, "heads": heads,
                     "max_abs_error": error, "sdpa_ms": round(sdpa_ms, 4), "kernel_ms": round(kernel_ms, 4),
                     "speedup": round(sdpa_ms / kernel_ms, 3)})
        print(rows[-1], flush=True)
    return rows


def linear_rows(device: str) -> list[dict[str, Any]]:
    """Compiled fp8 Linear against the compiled fp16 (fp32 on CPU) Linear."""
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    shapes = LINEAR_SHAPES if device.startswith("cuda") else CPU_LINEAR_SHAPES
    rows = []
    for label, batch, fan_in, fan_out in shapes:
        linear = torch.nn.Linear(fan_in, fan_out, device=device, dtype=dtype)
        quantised = Fp8Linear(linear)
        hidden = torch.randn(batch, fan_in, device=device, dtype=dtype)
        reference = linear(hidden).float()
        error = ((quantised(hidden).float() - reference).norm() / reference.norm()).item()
        row: dict[str, Any] = {"shape": label, "rows": batch, "in": fan_in, "out": fan_out,
                               "relative_error": round(error, 5)}
        if device.startswith("cuda"):
            base = torch.compile(linear, dynamic=False)
            fast = torch.compile(quantised, dynamic=False)
            base_ms = timed(lambda f=base, x=hidden: f(x), device)
            fast_ms = timed(lambda f=fast, x=hidden: f(x), device)
            tflop = 2 * batch * fan_in * fan_out / 1e12
            row |= {"fp16_ms": round(base_ms, 4), "fp8_ms": round(fast_ms, 4),
                    "speedup": round(base_ms / fast_ms, 3),
                    "fp16_tflops": round(tflop / base_ms * 1000, 1), "fp8_tflops": round(tflop / fast_ms * 1000, 1)}
        rows.append(row)
        print(row, flush=True)
    return rows


def channels_last_input(batch: int, frames: int, channels: int, side: int, per_frame: bool,
                        device: str, dtype: torch.dtype) -> torch.Tensor:
    """Channels-last frames; for a temporal norm, the (batch, C, frames, H, W) view of them."""
    flat = torch.randn(batch * frames, channels, side, side, device=device, dtype=dtype)
    flat = flat.contiguous(memory_format=torch.channels_last)
    if per_frame:
        return flat
    return flat[None].reshape(batch, frames, channels, side, side).permute(0, 2, 1, 3, 4)


def group_norm_rows(device: str) -> list[dict[str, Any]]:
    """Tiled GroupNorm + SiLU against ``F.group_norm`` + SiLU, both compiled on a GPU."""
    cuda = device.startswith("cuda")
    rows = []
    for label, *shape in GROUP_NORM_SHAPES if cuda else CPU_GROUP_NORM_SHAPES:
        x = channels_last_input(*shape, device, torch.float16 if cuda else torch.float32)
        rows.append({"shape": label, "input": list(x.shape)} | group_norm_row(x, device))
        print(rows[-1], flush=True)
    return rows


def group_norm_row(x: torch.Tensor, device: str) -> dict[str, Any]:
    from infra.engine.group_norm import TILE_POSITIONS, group_norm, tile_statistics

    channels = x.shape[1]
    weight, bias = torch.randn(channels, device=device), torch.randn(channels, device=device)

    def stock(t: torch.Tensor) -> torch.Tensor:
        return F.silu(F.group_norm(t, 32, weight.to(t.dtype), bias.to(t.dtype), 1e-5))

    def tiled(t: torch.Tensor) -> torch.Tensor:
        return F.silu(group_norm(t, 32, weight, bias, 1e-5))

    reference = F.silu(F.group_norm(x.float(), 32, weight, bias, 1e-5))
    if not device.startswith("cuda"):
        return {"tiled_max_abs_error": (tiled(x) - reference).abs().max().item()}
    from infra.engine.triton_kernels import channel_tile_stats

    base, fast = torch.compile(stock, dynamic=False), torch.compile(tiled, dynamic=False)
    flat = x.movedim(1, -1).reshape(x.shape[0], -1, channels)
    kernel, torch_stats = channel_tile_stats(flat, TILE_POSITIONS), tile_statistics(flat)
    stock_ms, tiled_ms = timed(lambda: base(x), device), timed(lambda: fast(x), device)
    copy_ms = timed(lambda: x.clone(), device)  # one read and one write: the floor
    return {"stock_max_abs_error": (base(x).float() - reference).abs().max().item(),
            "tiled_max_abs_error": (fast(x).float() - reference).abs().max().item(),
            "stats_max_rel_error": max(((a - b).abs().max() / b.abs().max()).item()
                                       for a, b in zip(kernel, torch_stats, strict=True)),
            "stock_ms": round(stock_ms, 4), "tiled_ms": round(tiled_ms, 4), "copy_ms": round(copy_ms, 4),
            "speedup": round(stock_ms / tiled_ms, 3), "copy_over_tiled": round(copy_ms / tiled_ms, 3)}


class UpBlockResnet(torch.nn.Module):
    """An up block's first ResNet as the UNet runs it: the previous level upsampled, concatenated
    with the skip connection (an add, as the transformers' residual hands it over), so inductor
    chooses the concatenation's layout."""

    def __init__(self, previous: int, skip: int, out: int) -> None:
        super().__init__()
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.upsampling import Upsample2D

        self.upsampler = Upsample2D(previous, use_conv=True, out_channels=previous)
        self.resnet = ResnetBlock2D(in_channels=previous + skip, out_channels=out, temb_channels=TIME_EMBEDDING)

    def forward(self, hidden: torch.Tensor, skip: torch.Tensor, residual: torch.Tensor,
                temb: torch.Tensor) -> torch.Tensor:
        return self.resnet(torch.cat([self.upsampler(hidden), skip + residual], dim=1), temb)


def up_block_rows(device: str) -> list[dict[str, Any]]:
    """The up blocks' first ResNets compiled with and without ``channels_last_inputs``."""
    rows = []
    for label, *shape in UP_BLOCK_SHAPES if device.startswith("cuda") else CPU_UP_BLOCK_SHAPES:
        rows.append({"shape": label} | up_block_row(*shape, device))
        print(rows[-1], flush=True)
    return rows


def up_block_row(batch: int, previous: int, skip: int, out: int, side: int, device: str) -> dict[str, Any]:
    from infra.engine.channels_last import convert_weights, use_channels_last_resnet_inputs

    cuda = device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    torch.manual_seed(0)
    stock = UpBlockResnet(previous, skip, out).to(device, dtype).eval()
    lever = UpBlockResnet(previous, skip, out).to(device, dtype).eval()
    lever.load_state_dict(stock.state_dict())
    for model in (stock, lever):
        convert_weights(model)
    use_channels_last_resnet_inputs(lever)
    last = {"memory_format": torch.channels_last}
    inputs = (torch.randn(batch, previous, side // 2, side // 2, device=device, dtype=dtype).contiguous(**last),
              torch.randn(batch, skip, side, side, device=device, dtype=dtype).contiguous(**last),
              torch.randn(batch, skip, side, side, device=device, dtype=dtype).contiguous(**last),
              torch.randn(batch, TIME_EMBEDDING, device=device, dtype=dtype))
    # As the engine compiles with ``channels_last``: inductor's layout optimisation forced on.
    with torch.no_grad(), torch._inductor.config.patch(force_layout_optimization=True):
        base, fast = torch.compile(stock, dynamic=False), torch.compile(lever, dynamic=False)
        row = {"input": [batch, previous + skip, side, side],
               "max_abs_error": (fast(*inputs).float() - base(*inputs).float()).abs().max().item()}
        if cuda:
            stock_ms, lever_ms = timed(lambda: base(*inputs), device), timed(lambda: fast(*inputs), device)
            row |= {"stock_ms": round(stock_ms, 4), "lever_ms": round(lever_ms, 4),
                    "speedup": round(stock_ms / lever_ms, 3)}
    return row


ROWS: dict[str, Callable[[str], list[dict[str, Any]]]] = {
    "short_attention": attention_rows, "fp8_linear": linear_rows,
    "channels_last_group_norm": group_norm_rows, "channels_last_inputs": up_block_rows,
}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.rows.split(",") if name.strip()]
    if not names:
        parser.error(f"--rows names no lever; known: {', '.join(ROWS)}")
    if unknown := [name for name in names if name not in ROWS]:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    slug = gpu.lower().replace(" ", "-")
    out = Path(args.out) / f"kernels-{slug}.json"
    # A partial run keeps the other levers' rows; each lever's rows carry the torch they ran on.
    report = json.loads(out.read_text()) if out.exists() and set(names) != set(ROWS) else {}
    report |= {"device": gpu, "torch": torch.__version__}
    for name in names:
        report[name] = ROWS[name](args.device)
        report.setdefault("torch_by_rows", {})[name] = torch.__version__
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
