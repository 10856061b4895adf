"""Inductor's tuning settings measured one UNet block at a time, at the blocks' own shapes.

Why: a whole-UNet compile under ``max-autotune`` runs longer than a device call (over 10
minutes), so whether its GEMM/convolution templates, their prologue/epilogue fusions and its
kernel tuning beat the default compile was never measured. Block by block it fits: every
repeated block of the UNet (ResNet, temporal convolution, spatial and temporal transformer,
up/down sampler) is captured with its real inputs during one eager UNet call with guidance
(batch 2, as a render runs it), then compiled on its own under each setting and timed
(CUDA-event medians). A step's total weighs each distinct block by how often a call runs it;
the blocks are 83 of a 512x16 call's modules and nearly all of its FLOPs (the time embedding,
``conv_in``/``conv_out`` and the first norm are left out). The model carries the ``fast``
preset's levers that change the graph (fused QKV, channels-last, the short-attention kernel, the
GroupNorm tiles where a norm outgrows the L2 cache: at 512x16 on an H100, the 64x64 temporal
norms).

1. build the UNet from its config with seeded random weights; 2. apply the levers through the
engine's own ``apply_plan``; 3. capture each distinct block's inputs; 4. per setting and block:
compile, time the first call (the compile), time the warm calls; 5. write JSON after each block,
so a run cut short by ``--budget`` keeps what it measured.

    python -m benchmarks.bench_blocks --settings eager,default,autotune --budget 1500
    python -m benchmarks.bench_blocks --tiny --settings eager,default --limit 2    # CPU test path
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks.bench_kernels import timed
from infra.engine import speed
from infra.engine.full import FULL_CONFIG_DIR
from infra.engine.tiny import CONFIG_DIR as TINY_CONFIG_DIR
from infra.engine.tiny import component_config

RESULTS_DIR = Path(__file__).parent / "results"
# name -> inductor options for torch.compile (None: eager). "autotune" is what the mode
# "max-autotune-no-cudagraphs" sets; "autotune-gemm" keeps only its GEMM/convolution templates
# (with their prologue/epilogue fusions), without the kernel tuning that "cdt" measures alone;
# "-tma" adds Hopper's persistent TMA matmul templates.
SETTINGS: dict[str, dict[str, Any] | None] = {
    "eager": None,
    "default": {},
    "cdt": {"coordinate_descent_tuning": True},
    "autotune-gemm": {"max_autotune_gemm": True},
    "autotune-gemm-tma": {"max_autotune_gemm": True, "triton.enable_persistent_tma_matmul": True},
    "autotune": {"max_autotune": True, "coordinate_descent_tuning": True},
}


def build_unet(tiny: bool, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The UNet alone, seeded random weights, with the ``fast`` levers that change its graph."""
    from diffusers import I2VGenXLUNet

    torch.manual_seed(0)
    with torch.device(device):
        unet = I2VGenXLUNet.from_config(component_config("unet", TINY_CONFIG_DIR if tiny else FULL_CONFIG_DIR))
    unet = unet.to(dtype).eval().requires_grad_(False)
    fast, on_cuda = speed.PRESETS["fast"], device.startswith("cuda")
    # Whole-model levers (packages, the VAE, the loop's timesteps) have no block to act on, the
    # Triton kernels need CUDA, and compiling is this benchmark's own, per block and setting.
    levers = replace(fast, compile="off", aot=False, compile_vae=False, host_timesteps=False,
                     short_attention=fast.short_attention and on_cuda,
                     channels_last_group_norm=fast.channels_last_group_norm and on_cuda)
    speed.apply_plan(SimpleNamespace(unet=unet), levers)  # type: ignore[arg-type]
    speed.configure_inductor(levers)
    return unet


def unet_inputs(unet: torch.nn.Module, size: int, frames: int) -> dict[str, torch.Tensor]:
    """One denoising call's inputs with classifier-free guidance (batch 2), as the pipeline passes them."""
    config, device, dtype = unet.config, unet.device, unet.dtype
    latent = (2, config.in_channels, frames, size // 8, size // 8)
    return {"sample": torch.randn(latent, device=device, dtype=dtype),
            "timestep": torch.tensor(500, device=device),
            "fps": torch.tensor([16, 16], device=device),
            "image_latents": torch.randn(latent, device=device, dtype=dtype),
            "image_embeddings": torch.randn(2, config.cross_attention_dim, device=device, dtype=dtype),
            "encoder_hidden_states": torch.randn(2, 77, config.cross_attention_dim, device=device, dtype=dtype)}


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), str(value.dtype))
    if isinstance(value, list | tuple):
        return tuple(_signature(item) for item in value)
    if isinstance(value, dict):
        return tuple((key, _signature(item)) for key, item in sorted(value.items()))
    return repr(value)


def capture_blocks(unet: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Each distinct (block class, input shapes) of one UNet call: its first module and inputs, and its count."""
    blocks: dict[Any, dict[str, Any]] = {}

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        key = (type(module).__name__, _signature(args), _signature(kwargs))
        if key not in blocks:
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            blocks[key] = {"block": type(module).__name__, "input": str(shapes[0]), "count": 0,
                           "module": module, "args": args, "kwargs": kwargs}
        blocks[key]["count"] += 1

    hooks = [module.register_forward_pre_hook(record, with_kwargs=True) for module in unet.modules()
             if type(module).__name__ in speed.REGION_CLASSES]
    try:
        with torch.no_grad():
            unet(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return list(blocks.values())


def measure(block: dict[str, Any], options: dict[str, Any] | None, device: str) -> dict[str, float]:
    """First-call seconds (the compile) and warm milliseconds of one block under one setting."""
    torch._dynamo.reset()
    module = block["module"]
    fn = module if options is None else torch.compile(module, options=options, dynamic=False, fullgraph=False)

    def call() -> Any:
        with torch.no_grad():
            return fn(*block["args"], **block["kwargs"])

    began = time.perf_counter()
    call()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    first = time.perf_counter() - began
    return {"first_call_s": round(first, 2), "ms": round(timed(call, device), 4)}


def totals(blocks: list[dict[str, Any]], settings: list[str]) -> dict[str, Any]:
    """Per setting: the step's block time (count x ms) over the blocks every setting measured."""
    done = [b for b in blocks if all(s in b["results"] for s in settings)]
    sums = {s: round(sum(b["count"] * b["results"][s]["ms"] for b in done), 3) for s in settings}
    return {"blocks_measured": len(done), "calls_covered": sum(b["count"] for b in done),
            "step_ms": sums, "compile_s": {s: round(sum(b["results"][s]["first_call_s"] for b in done), 1)
                                            for s in settings}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--settings", default="eager,default,autotune", help=f"comma list of {', '.join(SETTINGS)}")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (test path)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--limit", type=int, default=None, help="only the N costliest blocks (eager time x count)")
    parser.add_argument("--budget", type=float, default=None, help="seconds; no new compile after it")
    parser.add_argument("--compile-cache", default=None, help="persistent inductor cache dir")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    unknown = set(args.settings.split(",")) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; known: {', '.join(SETTINGS)}")
    return args


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure; return the report (also written to ``<out>/blocks-<gpu>-<size>x<frames>.json``)."""
    args = parse_args(argv)
    started = time.perf_counter()
    settings = ["eager"] + [s for s in args.settings.split(",") if s != "eager"]
    if args.compile_cache:
        speed.configure_compile_cache(Path(args.compile_cache).resolve())
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    unet = build_unet(args.tiny, args.device, dtype)
    blocks = capture_blocks(unet, unet_inputs(unet, args.size, args.frames))
    for block in blocks:
        block["results"] = {"eager": measure(block, None, args.device)}
    blocks.sort(key=lambda b: -b["count"] * b["results"]["eager"]["ms"])
    chosen = blocks[: args.limit] if args.limit else blocks
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    name = f"blocks-{gpu.lower().replace(' ', '-')}-{args.size}x{args.frames}.json"
    report: dict[str, Any] = {"command": "python -m benchmarks.bench_blocks " + " ".join(argv or sys.argv[1:]),
                              "gpu": gpu, "torch": torch.__version__, "settings": {s: SETTINGS[s] for s in settings}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report["totals"] = totals(chosen, settings)
    for block in chosen:
        for setting in settings[1:]:
            if args.budget and time.perf_counter() - started > args.budget:
                break
            block["results"][setting] = measure(block, SETTINGS[setting], args.device)
            print(f"{block['block']} {block['input']} x{block['count']} {setting}: {block['results'][setting]}",
                  flush=True)
        report["blocks"] = [{k: b[k] for k in ("block", "input", "count", "results")} for b in blocks]
        report["totals"] = totals(chosen, settings)
        (out / name).write_text(json.dumps(report, indent=1))
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / name).write_text(json.dumps(report, indent=1))
    print(json.dumps(report["totals"], indent=1))
    return report


if __name__ == "__main__":
    run()
