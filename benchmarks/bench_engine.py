"""Benchmark the engine against the stock diffusers I2VGen-XL pipeline, side by side.

One command (GPU):

    python -m benchmarks.bench_engine --size 512 --frames 16 --steps 50

builds the full-size I2VGen-XL architecture with seeded random weights (configs in
``infra/engine/configs/i2vgen-xl-full/``, no hub), runs the stock ``I2VGenXLPipeline`` and the
engine variants one after another in this process on the same GPU, and prints per variant:
seconds per video (median after warm-up), first-call seconds, peak GPU memory, achieved
TFLOP/s and share of the measured bf16 matmul peak, and output drift against stock. Results go
to ``benchmarks/results/engine-<gpu>-<size>x<frames>.{json,md}``.

Every engine variant is an ``EngineOptions`` rendered through ``Engine.render``: the code path
the tasks use. ``--tiny`` runs the same benchmark on the tiny model on the CPU (the test suite
does, so this script cannot rot). ``--small-card 8`` adds a run capped at 8 GiB of GPU memory
(``EngineOptions.gpu_memory_gb``) where the engine picks its memory mode itself.
``--second-start`` starts a fresh process on the same compile cache and times it from process
start to its first finished video (warm-up at start-up included).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402

RESULTS_DIR = Path(__file__).parent / "results"
PROMPT = "a lighthouse in a storm, waves crashing, cinematic"

# name -> EngineOptions fields (None: the stock diffusers pipeline, called directly).
VARIANTS: dict[str, dict[str, Any] | None] = {
    "stock": None,
    "engine-stock": {"preset": "stock"},
    "eager-fused-qkv": {"preset": "stock", "fuse_qkv": True},
    "eager-cudnn-attn": {"preset": "stock", "attention": "cudnn"},
    "eager-channels-last": {"preset": "stock", "channels_last": True},
    "compile": {"preset": "stock", "compile": "default"},
    "fast": {"preset": "fast"},
    "fast-bf16": {"preset": "fast", "dtype": "bfloat16"},
    "fast-cudagraphs": {"preset": "fast", "compile": "reduce-overhead"},
    "fast-channels-last": {"preset": "fast", "channels_last": True},
    "fast-cudnn-attn": {"preset": "fast", "attention": "cudnn"},
    "fast-decode-chunk4": {"preset": "fast", "decode_chunk_size": 4},
    "eager-cudnn-benchmark": {"preset": "stock", "cudnn_benchmark": True},
    "fast-cudnn-benchmark": {"preset": "fast", "cudnn_benchmark": True},
    "fast-cudnn-benchmark-attn": {"preset": "fast", "cudnn_benchmark": True, "attention": "cudnn"},
    "fast-cl": {"preset": "fast", "channels_last": True},
    "fast-cl-vae": {"preset": "fast", "channels_last": True, "compile_vae": True},
    "fast-vae": {"preset": "fast", "compile_vae": True},
    "auto": {},
    # Quality-trading (opt-in, never a preset): DPM-Solver++ capped at 25 steps; see the drift column.
    "dpm25": {"preset": "stock", "scheduler": "dpm++", "max_steps": 25},
    "fast-dpm25": {"preset": "fast", "scheduler": "dpm++", "max_steps": 25},
    "fast-short-attn": {"preset": "fast", "short_attention": True},
    "fast-device-timesteps": {"preset": "fast", "host_timesteps": False},
    "fast-fp8": {"preset": "fast", "fp8_linear": True},
    "fast-blocks": {"preset": "fast", "compile_scope": "blocks"},
    "fast-all": {"preset": "fast", "short_attention": True, "fp8_linear": True, "compile_vae": True},
    "fast-exact": {"preset": "fast", "short_attention": True, "compile_vae": True},
    "fast-jit": {"preset": "fast", "aot": False},  # `fast` as before AOTInductor packages
    "fast-no-gn": {"preset": "fast", "channels_last_group_norm": False},  # `fast` before 5 December
    "fast-jit-no-gn": {"preset": "fast", "aot": False, "channels_last_group_norm": False},
    "fast-jit-bf16": {"preset": "fast", "aot": False, "dtype": "bfloat16"},
    "fast-cdt": {"preset": "fast", "coordinate_descent_tuning": True},
    "fast-no-cl-inputs": {"preset": "fast", "channels_last_inputs": False},  # `fast` before 6 December, night
    # Guidance only at sigma in (0.28, 5.42]: the interval Kynkaenniemi et al. (2024) found best for
    # SD-XL, at I2VGen-XL's noise levels (timesteps 165-875 of 1000).
    "fast-interval": {"preset": "fast", "guidance_interval": (0.17, 0.87)},
    "interval": {"preset": "stock", "guidance_interval": (0.17, 0.87)},
    # DeepCache's interval of 3: two of every three steps on the deep features of the full one.
    "fast-cache3": {"preset": "fast", "feature_cache_interval": 3},
    "cache3": {"preset": "stock", "feature_cache_interval": 3},
    "fast-exact-blocks": {"preset": "fast", "short_attention": True, "compile_vae": True, "compile_scope": "blocks"},
}
DEFAULT_GPU_VARIANTS = "stock,fast,fast-cudagraphs"
DEFAULT_CPU_VARIANTS = "stock,engine-stock,auto,eager-fused-qkv"


@dataclass
class VariantResult:
    name: str
    options: dict[str, Any] | None
    status: str = "ok"  # ok | skipped | failed
    error: str | None = None
    load_seconds: float | None = None
    first_call_seconds: float | None = None
    seconds: list[float] = field(default_factory=list)
    median_seconds: float | None = None
    speedup_vs_stock: float | None = None
    peak_gib: float | None = None
    tflops: float | None = None
    share_of_matmul_peak: float | None = None
    drift_rel_l2: float | None = None
    drift_max_abs: float | None = None
    nonfinite: bool | None = None
    host_syncs: int | None = None
    memory_mode: str | None = None
    dtype: str | None = None
    speed: dict[str, Any] | None = None
    steps_run: int | None = None
    steps_guided: int | None = None  # ``guidance_interval`` runs the others on one half of the batch
    steps_cached: int | None = None  # ``feature_cache_interval``: steps on the outer level alone


def gib(n: int | float | None) -> float | None:
    return None if n is None else round(n / 1024**3, 3)


def make_image(size: int) -> PIL.Image.Image:
    """A deterministic RGB gradient with some structure (no files needed)."""
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, ((x // 16 + y // 16) % 2) * 200], axis=-1)
    return PIL.Image.fromarray(rgb.astype(np.uint8))


def cuda_ok(device: str) -> bool:
    import torch

    return device.startswith("cuda") and torch.cuda.is_available()


def sync(device: str) -> None:
    import torch

    if cuda_ok(device):
        torch.cuda.synchronize()


def free_all(device: str) -> None:
    import torch

    gc.collect()
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()
    gc.collect()
    if cuda_ok(device):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def matmul_peak_tflops(device: str) -> float | None:
    """Measure a large bf16 matrix product once (the ceiling the TFLOP/s share refers to)."""
    import torch

    if not cuda_ok(device):
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    reps = 20
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / reps
    del a, b
    return round(2 * n**3 / seconds / 1e12, 1)


def attention_micro(device: str, size: int, frames: int) -> dict[str, float]:
    """Milliseconds of the largest spatial self-attention per SDPA backend (informational)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not cuda_ok(device):
        return {}
    tokens = (size // 8) ** 2
    q = torch.randn(2 * frames, 5, tokens, 64, device=device, dtype=torch.float16)
    out: dict[str, float] = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]):
                fn = torch.nn.functional.scaled_dot_product_attention
                for _ in range(3):
                    fn(q, q, q)
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(10):
                    fn(q, q, q)
                end.record()
                torch.cuda.synchronize()
                out[name.lower()] = round(start.elapsed_time(end) / 10, 3)
        except Exception as error:  # a backend may not support the shape here
            out[name.lower()] = float("nan")
            print(f"attention micro {name}: {error}", file=sys.stderr)
    return out


def frames_drift(frames: np.ndarray, reference: np.ndarray | None) -> tuple[float | None, float | None]:
    if reference is None or frames.shape != reference.shape:
        return None, None
    a = frames.astype(np.float64)
    b = reference.astype(np.float64)
    norm = float(np.linalg.norm(b)) or 1.0
    return round(float(np.linalg.norm(a - b)) / norm, 5), float(np.abs(a - b).max())


class Bench:
    """Holds the request, the reference frames of stock, and the per-video FLOP count."""

    def __init__(self, args: argparse.Namespace, model_source: str, model_cache: Path) -> None:
        self.args = args
        self.device = args.device
        self.model_source = model_source
        self.model_cache = model_cache
        self.image = make_image(args.size)
        self.reference: np.ndarray | None = None
        self.stock_median: float | None = None
        self.flops_per_video: float | None = None
        self.flops_fixed = self.flops_per_step = 0.0
        self.matmul_peak: float | None = None
        self.engine: Any = None  # the engine variant's, closed before the next variant

    def request(self, steps: int | None = None) -> Any:
        from infra.engine.engine import RenderRequest

        return RenderRequest(
            image=self.image, prompt=PROMPT, negative_prompt=None,
            num_frames=self.args.frames, fps=16, steps=steps or self.args.steps,
            guidance_scale=self.args.guidance, width=self.args.size, height=self.args.size,
            seed=self.args.seed, model=self.model_source,
        )

    # --- stock: the diffusers pipeline called directly, as a user would --------------------
    def load_stock(self) -> Any:
        import diffusers
        import torch

        from infra.engine.loader import apply_text_model_shim

        dtype = torch.float16 if cuda_ok(self.device) else torch.float32
        pipe = diffusers.I2VGenXLPipeline.from_pretrained(self.model_source, dtype=dtype)
        apply_text_model_shim(pipe)  # transformers>=5.6 compatibility, no speed effect
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device)

    def call_stock(self, pipe: Any, steps: int | None = None) -> np.ndarray:
        import torch

        from infra.engine.engine import frames_to_uint8

        request = self.request(steps)
        torch.manual_seed(request.seed)
        generator = torch.Generator(device=self.device).manual_seed(request.seed)
        out = pipe(
            prompt=request.prompt, image=request.image, negative_prompt=None,
            height=request.height, width=request.width, num_frames=request.num_frames,
            target_fps=request.fps, num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            decode_chunk_size=1 if cuda_ok(self.device) else request.num_frames,
            generator=generator, output_type="np",
        )
        return frames_to_uint8(out.frames)

    def count_flops(self, pipe: Any) -> float:
        """FLOPs of one video: a 1-step and a 2-step call give fixed cost and cost per step."""
        from torch.utils.flop_counter import FlopCounterMode

        counts = []
        for steps in (1, 2):
            counter = FlopCounterMode(display=False)
            with counter:
                self.call_stock(pipe, steps)
            counts.append(counter.get_total_flops())
        self.flops_per_step = float(counts[1] - counts[0])
        self.flops_fixed = float(counts[0]) - self.flops_per_step
        return self.flops_fixed + self.flops_per_step * self.args.steps

    def flops_for(self, result: VariantResult) -> float:
        """FLOPs of one video of this variant: the steps it ran (``max_steps`` may cap them), each
        unguided one (``guidance_interval``) half a guided step's UNet batch."""
        run = result.steps_run or self.args.steps
        guided = run if result.steps_guided is None else result.steps_guided
        return self.flops_fixed + self.flops_per_step * (guided + (run - guided) / 2)

    def profile(self, call: Callable[[], np.ndarray], name: str) -> None:
        """Kernel time over one whole render, written beside the results: by kind of kernel
        (``profile-<variant>.json``) and kernel by kernel (top 40, ``profile-<variant>.txt``)."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            call()
        averages = prof.key_averages()
        table = averages.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
        kernels = [(event.key, event.self_device_time_total / 1e6, event.count) for event in averages
                   if event.device_type.name == "CUDA" and event.self_device_time_total > 0]
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"profile-{name}.txt").write_text(table)
        summary = kernel_summary(kernels)
        (out / f"profile-{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(table[:6000])
        print(json.dumps(summary["by_kind"], indent=1))

    # --- one variant ----------------------------------------------------------------------
    def run_variant(self, name: str, fields: dict[str, Any] | None) -> VariantResult:
        """Load, render warm-up + repeats, score against stock; a failure is reported, not raised."""
        import torch

        result = VariantResult(name=name, options=fields)
        free_all(self.device)
        is_cuda = cuda_ok(self.device)
        try:
            call = self.stock_call(result) if fields is None else self.engine_call(fields, result)
            frames = self.time_calls(call, result)
            if fields is None and self.reference is None:
                self.reference = frames
                self.stock_median = result.median_seconds
            self.score(name, call, frames, result)
        except Exception as error:  # report and go on with the next variant
            import traceback

            traceback.print_exc()
            result.status, result.error = "failed", f"{type(error).__name__}: {error}"[:500]
        finally:
            call = None  # drop the model (the call holds it) before the next variant
            if self.engine is not None:
                self.engine.close()  # gives back the weights AOT packages hold too
                self.engine = None
            free_all(self.device)
            if is_cuda:
                torch.cuda.set_per_process_memory_fraction(1.0)
        return result

    def stock_call(self, result: VariantResult) -> Callable[[], np.ndarray]:
        """The stock diffusers pipeline, loaded; FLOPs counted on it once per run."""
        start = time.perf_counter()
        pipe = self.load_stock()
        result.load_seconds = round(time.perf_counter() - start, 3)
        if self.flops_per_video is None and self.args.count_flops:
            self.flops_per_video = self.count_flops(pipe)
        result.memory_mode, result.dtype = "full", str(pipe.unet.dtype).split(".")[-1]
        return lambda: self.call_stock(pipe)

    def engine_call(self, fields: dict[str, Any], result: VariantResult) -> Callable[[], np.ndarray]:
        """The engine with these ``EngineOptions`` fields, warmed: the tasks' own code path."""
        from infra.engine.engine import Engine
        from infra.engine.loader import EngineOptions

        options = EngineOptions(device=self.device, **fields)
        if options.compile_cache_dir is None and self.args.compile_cache:
            options = EngineOptions(device=self.device, compile_cache_dir=self.args.compile_cache, **fields)
        engine = self.engine = Engine(options, model_cache=self.model_cache)
        start = time.perf_counter()
        loaded = engine.warm(self.model_source)
        result.load_seconds = round(time.perf_counter() - start, 3)
        result.memory_mode, result.dtype = loaded.memory_mode, loaded.dtype
        result.speed = loaded.speed.as_dict()

        def call() -> np.ndarray:
            rendered = engine.render(self.request())
            result.memory_mode = rendered.memory_mode  # an OOM fallback shows here
            result.steps_run, result.steps_guided = rendered.steps_run, rendered.steps_guided
            result.steps_cached = rendered.steps_cached
            # A package that could not be built ran under torch.compile: say so beside its time.
            assert result.speed is not None
            result.speed["aot_fallbacks"] = rendered.speed["aot_fallbacks"]
            return rendered.frames

        return call

    def time_calls(self, call: Callable[[], np.ndarray], result: VariantResult) -> np.ndarray:
        """Warm-up then timed calls (the first call's time kept apart); the last call's frames."""
        times: list[float] = []
        frames = None
        for index in range(self.args.warmup + self.args.repeats):
            sync(self.device)
            start = time.perf_counter()
            frames = call()
            sync(self.device)
            seconds = time.perf_counter() - start
            if index == 0:
                result.first_call_seconds = round(seconds, 3)
            if index >= self.args.warmup:
                times.append(round(seconds, 3))
        assert frames is not None
        result.seconds = times
        result.median_seconds = round(statistics.median(times), 3)
        return frames

    def score(self, name: str, call: Callable[[], np.ndarray], frames: np.ndarray, result: VariantResult) -> None:
        """Drift against stock, peak memory, host syncs, speed-up, TFLOP/s; the profile if asked."""
        import torch

        result.nonfinite = not bool(np.isfinite(frames.astype(np.float64)).all())
        result.drift_rel_l2, result.drift_max_abs = frames_drift(frames, self.reference)
        if cuda_ok(self.device):
            result.peak_gib = gib(torch.cuda.max_memory_allocated())
            result.host_syncs = count_host_syncs(call)
        if self.stock_median:
            result.speedup_vs_stock = round(self.stock_median / result.median_seconds, 3)
        if name == self.args.profile:
            self.profile(call, name)
        if self.flops_per_video and not result.steps_cached:  # a shallow step's FLOPs are not counted
            result.tflops = round(self.flops_for(result) / result.median_seconds / 1e12, 3)
            if self.matmul_peak:
                result.share_of_matmul_peak = round(result.tflops / self.matmul_peak, 3)


KERNEL_KINDS = (  # first match wins: (kind, name fragments); inductor names its kernels after
    # the ops they fuse ("triton_poi_fused_convolution_native_group_norm_silu"), so those go first.
    ("triton reduction (norms)", ("triton_per", "triton_red")),
    ("triton pointwise", ("triton_poi",)),
    ("short attention (Triton)", ("_short_attention_kernel",)),
    ("group norm statistics (Triton)", ("_channel_tile_stats_kernel",)),
    ("attention", ("sdpa", "fmha", "flash", "attention")),
    ("convolution", ("fprop", "conv", "dgrad", "wgrad")),
    ("matmul", ("nvjet", "gemm", "cutlass", "cublas")),
    ("copies and fills", ("memcpy", "memset", "copy", "fill")),
)


def kernel_summary(kernels: list[tuple[str, float, int]]) -> dict[str, Any]:
    """GPU seconds by kind of kernel, and the 30 most expensive generated (Triton) kernels."""
    by_kind: dict[str, dict[str, float]] = {}
    total = sum(seconds for _, seconds, _ in kernels)
    for name, seconds, count in kernels:
        lowered = name.lower()
        kind = next((kind for kind, parts in KERNEL_KINDS if any(part in lowered for part in parts)), "other")
        entry = by_kind.setdefault(kind, {"seconds": 0.0, "calls": 0})
        entry["seconds"] += seconds
        entry["calls"] += count
    for entry in by_kind.values():
        entry["share"] = round(entry["seconds"] / total, 4) if total else 0.0
        entry["seconds"] = round(entry["seconds"], 4)
    generated = sorted((k for k in kernels if k[0].startswith("triton_")), key=lambda k: -k[1])[:30]
    return {"gpu_seconds": round(total, 4),
            "by_kind": dict(sorted(by_kind.items(), key=lambda item: -item[1]["seconds"])),
            "top_generated": [{"kernel": name[:120], "seconds": round(seconds, 4), "calls": count}
                              for name, seconds, count in generated]}


def count_host_syncs(call: Callable[[], np.ndarray]) -> int:
    """Operations in one more call that made the host wait for the GPU (PyTorch's sync debug
    mode warns on each: a GPU value read back, a blocking copy). A sync inside the denoising loop
    drains the launch queue once per step."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def environment(device: str) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "gpu": None,
        "host": platform.node(),
    }
    if cuda_ok(device):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(
            gpu=props.name, gpu_memory_gib=gib(props.total_memory),
            sm_count=props.multi_processor_count, cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return env


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def markdown_table(report: dict[str, Any]) -> str:
    from infra.engine.speed import PRESETS

    stock_plan = PRESETS["stock"].as_dict()  # the levers column lists what differs from it
    env, cfg = report["environment"], report["config"]
    lines = [
        f"# Engine benchmark: {env.get('gpu') or env['device']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{cfg['size']}x{cfg['size']}, {cfg['frames']} frames, {cfg['steps']} steps, guidance "
        f"{cfg['guidance']}, seed {cfg['seed']}; median of {cfg['repeats']} after "
        f"{cfg['warmup']} warm-up. torch {env['torch']}, diffusers {env['diffusers']}, "
        f"transformers {env['transformers']}. Matmul peak (bf16 8192^3): "
        f"{report.get('matmul_peak_tflops')} TFLOP/s. FLOPs per video: "
        f"{report.get('flops_per_video_tflop')} TFLOP.",
        "",
        "| variant | s/video (median) | x stock | first call s | load s | peak GiB | TFLOP/s "
        "| share of peak | drift rel L2 | host syncs | memory mode | levers |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["variants"]:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['status']}: {r['error'] or ''} |  |  |  |  |  |  |  |  |  |  |")
            continue
        speed = r.get("speed") or {}
        levers = ", ".join(
            f"{k}={v}" for k, v in speed.items()
            if k not in ("preset", "compile_cache_dir", "skipped", "aot_fallbacks") and stock_plan.get(k) != v
        ) or "-"
        if r.get("options") and "decode_chunk_size" in r["options"]:
            levers += f", decode_chunk={r['options']['decode_chunk_size']}"
        if (r.get("steps_guided") or 0) < (r.get("steps_run") or 0):
            levers += f", guided steps {r['steps_guided']} of {r['steps_run']}"
        if r.get("steps_cached"):
            levers += f", steps on cached features {r['steps_cached']} of {r['steps_run']}"
        if speed.get("aot_fallbacks"):
            levers += f"; **aot fell back to torch.compile**: {'; '.join(speed['aot_fallbacks'])}"
        lines.append(
            f"| {r['name']} | {r['median_seconds']} | {r['speedup_vs_stock']} | "
            f"{r['first_call_seconds']} | {r['load_seconds']} | {r['peak_gib']} | {r['tflops']} | "
            f"{r['share_of_matmul_peak']} | {r['drift_rel_l2']} | {r.get('host_syncs')} | {r['memory_mode']} | "
            f"{levers} |"
        )
    if report.get("second_start"):
        s = report["second_start"]
        lines += ["", "Second start of a worker (same compile cache, fresh process):", "",
                  "```", json.dumps(s, indent=1), "```"]
    if report.get("attention_micro_ms"):
        lines += ["", f"Largest spatial self-attention, ms per backend: {report['attention_micro_ms']}"]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    env, cfg = report["environment"], report["config"]
    stem = f"engine-{slug(env.get('gpu') or env['device'])}-{cfg['size']}x{cfg['frames']}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=1, default=str))
    md_path.write_text(markdown_table(report))
    return json_path, md_path


def second_start(args: argparse.Namespace, model_source: str, model_cache: Path) -> dict[str, Any]:
    """Start a fresh worker process on the same compile cache; time start -> first video."""
    cmd = [
        sys.executable, "-m", "benchmarks.bench_engine", "--child-second-start",
        "--model-source", model_source, "--model-cache", str(model_cache),
        "--size", str(args.size), "--frames", str(args.frames), "--steps", str(args.steps),
        "--device", args.device, "--variants", args.second_start,
    ]
    if args.compile_cache:
        cmd += ["--compile-cache", args.compile_cache]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.second_start_timeout,
                          env={**os.environ, "I2VFLOW_SPAWN_TIME": repr(start)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SECOND_START ")]
    if proc.returncode != 0 or not lines:
        return {"status": "failed", "returncode": proc.returncode, "stderr": proc.stderr[-2000:]}
    return {"status": "ok", **json.loads(lines[-1].removeprefix("SECOND_START "))}


def child_second_start(args: argparse.Namespace) -> None:
    """Worker start-up as ``i2vflow gpu-worker`` would do it: load, warm up, then serve jobs."""
    spawn = float(os.environ.get("I2VFLOW_SPAWN_TIME", time.time()))
    import torch  # import cost is part of the start

    from infra.engine.engine import Engine
    from infra.engine.loader import EngineOptions

    imported = time.time() - spawn
    # Phases a worker pays once per process, timed apart so the start-up can be read.
    began = time.time()
    import diffusers

    _ = diffusers.I2VGenXLPipeline  # lazy: imports the transformers CLIP models
    pipeline_import = time.time() - began
    began = time.time()
    if args.device.startswith("cuda"):
        torch.empty(1, device=args.device)
    cuda_init = time.time() - began
    fields = VARIANTS[args.variants] or {}
    engine = Engine(
        EngineOptions(device=args.device, compile_cache_dir=args.compile_cache, **fields),
        model_cache=Path(args.model_cache),
    )
    bench = Bench(args, args.model_source, Path(args.model_cache))
    warm_start = time.time()
    loaded = engine.warm(args.model_source, warmup=bench.request(steps=2))
    ready = time.time() - spawn
    first = engine.render(bench.request())
    first_done = time.time() - spawn
    second = engine.render(bench.request())
    print("SECOND_START " + json.dumps({
        "variant": args.variants,
        "import_s": round(imported, 2),
        "pipeline_import_s": round(pipeline_import, 2),
        "cuda_init_s": round(cuda_init, 2),
        "load_s": round(loaded.load_seconds, 2),
        "load_and_warmup_s": round(time.time() - warm_start - first.render_seconds
                                   - second.render_seconds, 2),
        "ready_s": round(ready, 2),
        "first_video_done_s": round(first_done, 2),
        "first_video_render_s": round(first.render_seconds, 3),
        "warm_video_s": round(second.render_seconds, 3),
        "overhead_over_warm_video_s": round(first_done - second.render_seconds, 2),
    }), flush=True)


def prepare_model(args: argparse.Namespace) -> tuple[str, Path]:
    """Build (once) the model this run measures; return its folder and the model cache."""
    model_cache = Path(args.model_cache or tempfile.mkdtemp(prefix="i2vflow-bench-")).resolve()
    if args.tiny:
        from infra.engine.tiny import build_tiny_i2vgenxl

        folder = build_tiny_i2vgenxl(model_cache / "tiny-i2vgen-xl")
    else:
        from infra.engine.full import build_full_i2vgenxl

        folder = build_full_i2vgenxl(model_cache / "i2vgen-xl-random")
    return str(folder), model_cache


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=9.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--variants", default=None,
                        help=f"comma list of {', '.join(VARIANTS)} (stock is always first)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="tiny model (CPU test path)")
    parser.add_argument("--model-cache", default=None, help="where the model is built/reused")
    parser.add_argument("--compile-cache", default=None, help="persistent inductor cache dir")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--small-card", type=float, default=None,
                        help="also render under a GiB cap (e.g. 8): the engine picks its mode")
    parser.add_argument("--second-start", default=None,
                        help="variant to start in a fresh process on the same compile cache")
    parser.add_argument("--second-start-timeout", type=int, default=400)
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds; variants not started by then are skipped")
    parser.add_argument("--profile", default=None, help="variant to profile (one render)")
    parser.add_argument("--no-count-flops", dest="count_flops", action="store_false")
    parser.add_argument("--child-second-start", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-source", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.variants is None:
        args.variants = DEFAULT_GPU_VARIANTS if cuda_ok(args.device) else DEFAULT_CPU_VARIANTS
    return args


def run(argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark; return the report (also written as JSON and Markdown)."""
    args = parse_args(argv)
    if args.child_second_start:
        child_second_start(args)
        return {}
    started = time.perf_counter()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    names = ["stock"] + [n for n in names if n != "stock"]
    build_start = time.perf_counter()
    model_source, model_cache = prepare_model(args)
    report: dict[str, Any] = {
        "command": "python -m benchmarks.bench_engine "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(args.device),
        "config": {k: getattr(args, k) for k in ("size", "frames", "steps", "guidance", "seed",
                                                   "repeats", "warmup", "tiny")},
        "model_build_seconds": round(time.perf_counter() - build_start, 2),
        "variants": [],
    }
    bench = Bench(args, model_source, model_cache)
    bench.matmul_peak = matmul_peak_tflops(args.device)
    report["matmul_peak_tflops"] = bench.matmul_peak
    report["attention_micro_ms"] = attention_micro(args.device, args.size, args.frames)
    log(f"environment: {report['environment']}; matmul peak {bench.matmul_peak} TFLOP/s; "
        f"attention ms {report['attention_micro_ms']}")
    plan: list[tuple[str, dict[str, Any] | None]] = [(n, VARIANTS[n]) for n in names]
    if args.small_card:
        plan.append((f"small-card-{args.small_card:g}gib",
                     {"gpu_memory_gb": args.small_card}))
    for name, fields in plan:
        if args.budget and time.perf_counter() - started > args.budget:
            report["variants"].append(asdict(VariantResult(name, fields, status="skipped",
                                                           error="time budget")))
            continue
        result = bench.run_variant(name, fields)
        if bench.flops_per_video:
            report["flops_per_video_tflop"] = round(bench.flops_per_video / 1e12, 2)
        report["variants"].append(asdict(result))
        log(f"{name}: {json.dumps(asdict(result), default=str)}")
        write_report(report, Path(args.out))
    if args.second_start:
        report["second_start"] = second_start(args, model_source, model_cache)
        log(f"second start: {report['second_start']}")
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    json_path, md_path = write_report(report, Path(args.out))
    log(md_path.read_text())
    log(f"wrote {json_path} and {md_path}")
    return report


if __name__ == "__main__":
    run()
