"""Speed levers of the engine: what to apply to a loaded pipeline on a GPU, and how.

Why a module of its own: every lever is a setting of ``EngineOptions`` that the tasks use,
so the benchmark measures exactly the code path that serves jobs (no benchmark-only path).
``resolve_plan`` turns options (a ``preset`` plus per-lever overrides) into a ``SpeedPlan``;
``apply_plan`` applies it to a pipeline already placed on its device and reports what it
really did (a lever that does not fit the model or the memory mode is skipped, with the reason),
so every render's sidecar can say which levers ran.

Presets:
- ``stock``: nothing; the pipeline exactly as diffusers ships it.
- ``fast``: the measured fast path on CUDA (see docs/performance.md): the UNet compiled by
  inductor with fused QKV projections, channels-last convolutions, the temporal
  self-attention through a Triton kernel (``short_attention``) and the VAE decoder compiled
  too, both ahead of time into AOTInductor packages on disk (``aot``, one per shape), so a
  worker's later starts load them instead of re-tracing with Dynamo; the scheduler's
  timesteps kept on the host (``host_timesteps``), so the denoising loop has no host sync; and
  the temporal layers' GroupNorm statistics read along channels-last memory where a norm's input
  outgrows the L2 cache (``channels_last_group_norm``: large shapes such as 768x24); and every
  ResNet block's input stored channels-last (``channels_last_inputs``), so the up blocks' norms
  read their concatenated skip connections along memory.
- ``auto`` (default): ``fast`` on CUDA, ``stock`` elsewhere (on a CPU nothing changes).

Levers outside every preset (measured, opt-in): ``compile_scope="blocks"`` (compile the UNet's
repeated blocks instead of the whole graph: cannot be packaged ahead of time, so every start
compiles; large shapes render faster, 512x512 slightly slower) and ``fp8_linear`` (e4m3
matmuls in the transformers, Hopper/Ada only; slower than fp16 at I2VGen-XL's shapes and it
changes numerics, so it stays off; the benchmark reports its speed and drift), and
``coordinate_descent_tuning`` (inductor tunes each generated kernel's launch by coordinate
descent: 2.2% faster renders at 512x16 on an H100 for a first compile 2.5 times as long, so it
pays where the compile cache persists: long-lived hosts, or a fleet image that ships it).

Quality-trading levers are never part of a preset: ``scheduler="dpm++"`` (DPM-Solver++, which
reaches a usable image in fewer steps than the pipeline's DDIM) and ``max_steps`` (cap the
denoising steps of every job) and ``guidance_interval`` (classifier-free guidance only at the
noise levels within ``[low, high]``; elsewhere the UNet runs on the prompt's half alone, half a
step's work) and ``feature_cache_interval`` (DeepCache: a full UNet step every N steps, the steps
between only its outer level on the deep features kept from the last full one). They change
the output; the benchmark reports by how much (drift against stock), and each video's sidecar
names them and the steps really run (guided, and reusing features).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import torch

from infra.engine import aot, channels_last, feature_cache, fp8, group_norm, guidance_interval, short_attention
from infra.engine.host_timesteps import keep_timesteps_on_host

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from infra.engine.loader import EngineOptions

log = structlog.get_logger("i2vflow.engine")

PRESETS_ALLOWED = ("auto", "stock", "fast")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
ATTENTION_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
SCHEDULERS = ("default", "dpm++")
COMPILE_SCOPES = ("model", "blocks")
# Regional compilation: these blocks repeat through the UNet; each distinct shape compiles once.
REGION_CLASSES = ("ResnetBlock2D", "TemporalConvLayer", "Transformer2DModel", "TransformerTemporalModel",
                  "Downsample2D", "Upsample2D")
DEFAULT_COMPILE_CACHE = Path("~/.cache/i2vflow/inductor")
COMPILE_CACHE_ENV = "I2VFLOW_COMPILE_CACHE"


@dataclass(frozen=True)
class SpeedPlan:
    """The levers one loaded model runs with; ``as_dict`` goes into every render's account."""

    preset: str = "stock"
    compile: str = "off"
    fuse_qkv: bool = False
    channels_last: bool = False
    attention: str = "auto"
    cudnn_benchmark: bool = False
    compile_vae: bool = False
    compile_cache_dir: str | None = None
    compile_scope: str = "model"
    aot: bool = False
    short_attention: bool = False
    channels_last_group_norm: bool = False
    channels_last_inputs: bool = False
    host_timesteps: bool = False
    coordinate_descent_tuning: bool = False
    fp8_linear: bool = False
    scheduler: str = "default"  # quality-trading (opt-in only)
    max_steps: int | None = None  # quality-trading (opt-in only)
    guidance_interval: tuple[float, float] | None = None  # quality-trading (opt-in only)
    feature_cache_interval: int | None = None  # quality-trading (opt-in only)
    skipped: tuple[str, ...] = ()

    def steps_for(self, requested: int) -> int:
        return min(requested, self.max_steps) if self.max_steps else requested

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped"] = list(self.skipped)
        return data


PRESETS: dict[str, SpeedPlan] = {
    "stock": SpeedPlan(preset="stock"),
    # Measured on H100 (docs/performance.md): compile default mode + fused QKV + channels-last
    # convolutions + the short-attention kernel + compiled VAE decoder: 512x512x16x50 in
    # 6.33-6.56 s against stock's 11.5-11.7 s, output within fp16 rounding of the compiled UNet's.
    # AOTInductor packages (``aot``) instead of Dynamo at every start: as fast (6.17 s), and a
    # worker's second start is ready 16.6 s after its process starts instead of 52 s.
    # Timesteps on the host: no host sync per step, so a busy GPU worker's other threads
    # (storing the last result, staging the next job) cannot stall the GPU mid-render.
    # The temporal norms' statistics by channels-last tiles where a norm's input outgrows the L2
    # cache: 768x24 1.43x -> 1.65x stock with the limit at two L2 caches, 1.020-1.027x more at one
    # (7 December 2026); 512x16's render unchanged either way.
    # Every ResNet block's input channels-last, so the up blocks' concatenated skip connections are
    # not read across the grain by their norms: 512x16 6.085 -> 5.960 s in one process, 768x24
    # 22.51-22.66 -> 22.13 s (H100, 6 December 2026).
    "fast": SpeedPlan(preset="fast", compile="default", fuse_qkv=True, channels_last=True,
                      short_attention=True, compile_vae=True, aot=True, host_timesteps=True,
                      channels_last_group_norm=True, channels_last_inputs=True),
}


def check_options(options: EngineOptions) -> None:
    """Raise a precise ``ValueError`` for a speed option outside its allowed values."""
    if options.preset not in PRESETS_ALLOWED:
        raise ValueError(f"`preset` must be one of {PRESETS_ALLOWED} but is {options.preset!r}")
    if options.compile is not None and options.compile not in COMPILE_MODES:
        raise ValueError(
            f"`compile` must be None or one of {COMPILE_MODES} but is {options.compile!r}"
        )
    if options.attention not in ATTENTION_BACKENDS:
        raise ValueError(
            f"`attention` must be one of {ATTENTION_BACKENDS} but is {options.attention!r}"
        )
    if options.compile_scope not in COMPILE_SCOPES:
        raise ValueError(
            f"`compile_scope` must be one of {COMPILE_SCOPES} but is {options.compile_scope!r}"
        )
    if options.scheduler not in SCHEDULERS:
        raise ValueError(f"`scheduler` must be one of {SCHEDULERS} but is {options.scheduler!r}")
    if options.max_steps is not None and options.max_steps < 1:
        raise ValueError(f"`max_steps` must be None or >= 1 but is {options.max_steps}")
    if options.guidance_interval is not None:
        guidance_interval.check_interval(options.guidance_interval)
    if options.feature_cache_interval is not None:
        feature_cache.check_interval(options.feature_cache_interval)
    if options.gpu_memory_gb is not None and options.gpu_memory_gb <= 0:
        raise ValueError(f"`gpu_memory_gb` must be None or > 0 but is {options.gpu_memory_gb}")


# EngineOptions fields where None means "the preset's".
_PRESET_OVERRIDABLE = ("compile", "fuse_qkv", "channels_last", "cudnn_benchmark", "compile_vae", "short_attention",
                       "channels_last_group_norm", "channels_last_inputs", "aot", "host_timesteps",
                       "coordinate_descent_tuning")


def resolve_plan(options: EngineOptions, device: str, memory_mode: str) -> SpeedPlan:
    """Preset first, then each lever the options set explicitly; then what cannot apply.

    ``auto`` means ``fast`` on CUDA and ``stock`` elsewhere. With model CPU offload the
    UNet moves between devices, so compilation is skipped (and said so).
    """
    preset = options.preset
    if preset == "auto":
        preset = "fast" if device.startswith("cuda") else "stock"
    overrides: dict[str, Any] = {
        name: getattr(options, name) for name in _PRESET_OVERRIDABLE if getattr(options, name) is not None}
    if options.attention != "auto":
        overrides["attention"] = options.attention
    plan = replace(PRESETS[preset], **overrides, compile_scope=options.compile_scope, fp8_linear=options.fp8_linear,
                   scheduler=options.scheduler, max_steps=options.max_steps,
                   guidance_interval=options.guidance_interval,
                   feature_cache_interval=options.feature_cache_interval)
    plan, skipped = _without_what_cannot_apply(plan, device, memory_mode)
    if plan.compile == "off":
        plan = replace(plan, compile_scope="model")
    else:
        plan = replace(plan, compile_cache_dir=str(compile_cache_dir(options.compile_cache_dir)))
    return replace(plan, skipped=tuple(skipped))


def _without_what_cannot_apply(plan: SpeedPlan, device: str, memory_mode: str) -> tuple[SpeedPlan, list[str]]:
    """Turn off each lever this device, memory mode or another lever rules out, saying why."""
    skipped: list[str] = []
    if plan.feature_cache_interval and memory_mode == "offload":
        # Offload moves the UNet to the GPU from a wrapper of its forward, which the cache would replace.
        skipped.append(f"feature_cache_interval={plan.feature_cache_interval} (memory_mode=offload wraps the UNet)")
        plan = replace(plan, feature_cache_interval=None)
    if plan.compile != "off" and memory_mode == "offload":
        skipped.append(f"compile={plan.compile} (memory_mode=offload moves the UNet)")
        plan = replace(plan, compile="off")
    if plan.compile != "off" and device.startswith("cuda") and importlib.util.find_spec("triton") is None:
        # Inductor generates Triton kernels for CUDA: without it the first render would fail.
        skipped.append(f"compile={plan.compile} (Triton is not installed)")
        plan = replace(plan, compile="off")
    if plan.compile_vae and plan.compile == "off":
        skipped.append("compile_vae (needs compile)")
        plan = replace(plan, compile_vae=False)
    if plan.aot and plan.compile == "off":
        skipped.append("aot (needs compile)")
        plan = replace(plan, aot=False)
    if plan.aot and plan.compile != "default":
        skipped.append(f"aot (packages the default compile mode only; compile={plan.compile})")
        plan = replace(plan, aot=False)
    if plan.aot and plan.compile_scope != "model":
        skipped.append(f"aot (packages whole models; compile_scope={plan.compile_scope})")
        plan = replace(plan, aot=False)
    if plan.attention != "auto" and not device.startswith("cuda"):
        skipped.append(f"attention={plan.attention} (CUDA only)")
        plan = replace(plan, attention="auto")
    if plan.cudnn_benchmark and not device.startswith("cuda"):
        skipped.append("cudnn_benchmark (CUDA only)")
        plan = replace(plan, cudnn_benchmark=False)
    reason = short_attention.unsupported_reason(device) if plan.short_attention else None
    if reason:
        skipped.append(f"short_attention ({reason})")
        plan = replace(plan, short_attention=False)
    reason = group_norm.unsupported_reason(device) if plan.channels_last_group_norm else None
    if plan.channels_last_group_norm and plan.compile == "off" and not reason:
        # Eager, the normalisation the tiles leave would be several passes instead of one fused kernel.
        reason = "needs compile: inductor fuses the normalisation"
    if plan.channels_last_group_norm and not plan.channels_last:
        reason = "needs channels_last: it serves channels-last inputs only"
    if reason:
        skipped.append(f"channels_last_group_norm ({reason})")
        plan = replace(plan, channels_last_group_norm=False)
    if plan.channels_last_inputs and (plan.compile == "off" or not plan.channels_last):
        why = "needs compile: it sets a layout inside compiled graphs" if plan.channels_last else "needs channels_last"
        skipped.append(f"channels_last_inputs ({why})")
        plan = replace(plan, channels_last_inputs=False)
    if plan.coordinate_descent_tuning and (plan.compile == "off" or not device.startswith("cuda")):
        why = "needs compile" if plan.compile == "off" else "CUDA only: it tunes Triton kernels"
        skipped.append(f"coordinate_descent_tuning ({why})")
        plan = replace(plan, coordinate_descent_tuning=False)
    if plan.fp8_linear and not fp8.fp8_supported(device):
        skipped.append("fp8_linear (needs a CUDA GPU of compute capability 8.9 or newer)")
        plan = replace(plan, fp8_linear=False)
    return plan, skipped


def compile_cache_dir(configured: str | None) -> Path:
    """Where inductor keeps compiled kernels and FX graphs across processes."""
    value = configured or os.environ.get(COMPILE_CACHE_ENV) or str(DEFAULT_COMPILE_CACHE)
    # Absolute: AOTInductor's C++ compile fails on a relative cache path.
    return Path(value).expanduser().absolute()


def configure_compile_cache(cache_dir: str | Path) -> None:
    """Point inductor's persistent caches (FX graphs, Triton kernels) at ``cache_dir``.

    Why: a compiled UNet costs minutes on a cold cache and far less on a warm one; a worker's
    second start must find the first start's work. Set before the first compile.
    """
    path = Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True


def configure_inductor(plan: SpeedPlan) -> None:
    """Set inductor's process-wide switches that ``plan`` owns, before the first compile.

    Compilation is lazy (first call of each shape), so these must still hold then; the AOT
    packages' key (``aot.module_fingerprint``) reads them, so a package built under other
    switches is never reused.
    """
    import torch._inductor.config as inductor_config

    # Inductor's own heuristic keeps the UNet's convolutions NCHW, so cuDNN transposes around
    # every one of them; ``channels_last`` forces channels-last layouts inside compiled graphs.
    # The plan owns both switches, both ways: one left on by an earlier plan (or by
    # TORCHINDUCTOR_COORDINATE_DESCENT_TUNING) would change this plan's kernels and its packages' key.
    inductor_config.force_layout_optimization = plan.channels_last
    inductor_config.coordinate_descent_tuning = plan.coordinate_descent_tuning


def apply_plan(pipeline: DiffusionPipeline, plan: SpeedPlan) -> SpeedPlan:
    """Apply ``plan`` to a placed pipeline; return the plan as really applied."""
    skipped = list(plan.skipped)
    unet = pipeline.unet
    if plan.fuse_qkv:
        try:
            unet.fuse_qkv_projections()
        except (ValueError, AttributeError) as error:
            skipped.append(f"fuse_qkv ({error})")
            plan = replace(plan, fuse_qkv=False)
    if plan.short_attention:
        short_attention.use_short_attention(unet)
    if plan.fp8_linear:
        fp8.use_fp8_linears(unet)
    if plan.channels_last:
        channels_last.convert_weights(unet)
        if plan.compile_vae:
            channels_last.convert_weights(pipeline.vae.decoder)
    if plan.channels_last_inputs:
        channels_last.use_channels_last_resnet_inputs(unet)
    if plan.channels_last_group_norm:
        min_bytes = group_norm.min_tiled_bytes(unet.device)
        norms = group_norm.use_channels_last_group_norm(unet, min_bytes)
        if plan.compile_vae:
            norms += group_norm.use_channels_last_group_norm(pipeline.vae.decoder, min_bytes)
        log.info("channels_last_group_norm.applied", norms=norms, tiles_above_mib=round(min_bytes / 2**20, 1))
    if plan.scheduler == "dpm++":
        from diffusers import DPMSolverMultistepScheduler

        # Same noise schedule (betas, zero-SNR rescaling, spacing) as the model's own scheduler.
        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    if plan.guidance_interval is not None:
        guidance_interval.use_guidance_interval(pipeline, plan.guidance_interval)
    if plan.host_timesteps:
        keep_timesteps_on_host(pipeline)
    # The UNet's graphs: itself, or the feature cache's two steps over it.
    graphs: list[tuple[torch.nn.Module, str]] = [(unet, "unet")]
    if plan.feature_cache_interval:
        cache = feature_cache.use_feature_cache(pipeline, plan.feature_cache_interval)
        graphs = [(cache.deep, "unet-deep"), (cache.shallow, "unet-shallow")]
    if plan.cudnn_benchmark:
        # Process-wide: cuDNN times its convolution algorithms once per shape and keeps the
        # fastest (the UNet's shapes are fixed per request shape).
        torch.backends.cudnn.benchmark = True
    if plan.compile != "off":
        assert plan.compile_cache_dir is not None
        configure_compile_cache(plan.compile_cache_dir)
        mode = None if plan.compile == "default" else plan.compile
        configure_inductor(plan)
        if plan.aot:
            for graph, name in graphs:
                aot.use_aot_packages(graph, plan.compile_cache_dir, name)
        elif plan.compile_scope == "blocks":
            _compile(unet, mode, "blocks")  # the blocks are shared by the feature cache's steps
        else:
            for graph, _name in graphs:
                _compile(graph, mode, "model")
        if plan.compile_vae and plan.aot:
            aot.use_aot_packages(pipeline.vae.decoder, plan.compile_cache_dir, "vae-decoder")
        elif plan.compile_vae:
            # Decoder only (called once per chunk of frames); no CUDA graphs: its outputs are
            # kept across calls (torch.cat of chunks). Always whole: compiled per block it
            # rendered 0.16 s slower and did not start faster (docs/performance.md).
            _compile(pipeline.vae.decoder, None, "model")
    plan = replace(plan, skipped=tuple(skipped))
    log.info("speed.applied", **plan.as_dict())
    return plan


def _packaged(pipeline: DiffusionPipeline) -> list[tuple[str, aot.AotDispatcher]]:
    """The ``aot`` lever's dispatchers in ``pipeline``, by module name."""
    vae = getattr(pipeline, "vae", None)
    modules = [("unet", getattr(pipeline, "unet", None)), ("vae-decoder", getattr(vae, "decoder", None))]
    cache = feature_cache.feature_cache_of(pipeline)
    if cache is not None:
        modules += [("unet-deep", cache.deep), ("unet-shallow", cache.shallow)]
    found = [(name, getattr(module, "__dict__", {}).get("forward")) for name, module in modules]
    return [(name, dispatcher) for name, dispatcher in found if isinstance(dispatcher, aot.AotDispatcher)]


def aot_fallbacks(pipeline: DiffusionPipeline) -> list[str]:
    """Signatures the ``aot`` lever could not package (they ran under ``torch.compile``), why."""
    return [f"{name}: {reason}" for name, dispatcher in _packaged(pipeline) for reason in dispatcher.failures.values()]


def release_aot_packages(pipeline: DiffusionPipeline) -> None:
    """Free the weights ``pipeline``'s packages hold (AOTInductor never lets go of them: ``aot``);
    only for a pipeline about to be dropped. Each dispatcher logs the bytes it gave back."""
    for _name, dispatcher in _packaged(pipeline):
        dispatcher.release()


def _compile(model: torch.nn.Module, mode: str | None, scope: str) -> None:
    """``torch.compile`` the whole model, or each of its repeated blocks (``scope="blocks"``)."""
    if scope == "model":
        model.compile(mode=mode, dynamic=False, fullgraph=False)
        return
    import torch._dynamo.config as dynamo_config

    # One compiled entry per distinct (block class, shape): more than dynamo's default of 8.
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    for module in model.modules():
        if type(module).__name__ in REGION_CLASSES:
            module.compile(mode=mode, dynamic=False, fullgraph=False)


_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


@contextlib.contextmanager
def attention_context(plan: SpeedPlan | None) -> Iterator[None]:
    """Restrict scaled-dot-product attention to the plan's backend (``auto``: no change)."""
    if plan is None or plan.attention == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # The chosen backend first; the others stay as fallbacks for shapes it cannot take
    # (the VAE's attention has head_dim 512, beyond flash and cuDNN).
    first = getattr(SDPBackend, _BACKENDS[plan.attention])
    rest = [getattr(SDPBackend, name) for name in _BACKENDS.values()]
    order = [first, *[backend for backend in rest if backend != first]]
    with sdpa_kernel(order, set_priority=True):
        yield


def memory_cap_bytes(device: str) -> int | None:
    """The per-process cap set by ``set_per_process_memory_fraction`` (None when none)."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if getter is None:
        return None
    fraction = getter(index)
    if fraction >= 1.0:
        return None
    return int(fraction * torch.cuda.get_device_properties(index).total_memory)


def apply_memory_cap(device: str, gpu_memory_gb: float | None) -> None:
    """Cap this process at ``gpu_memory_gb`` (emulates a small card; None: no cap)."""
    if gpu_memory_gb is None:
        return
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = min(1.0, gpu_memory_gb * 1024**3 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    log.info("memory.cap", device=device, gpu_memory_gb=gpu_memory_gb, fraction=round(fraction, 4))


def usable_memory_bytes(device: str) -> int:
    """Free memory this process may still use: the driver's free, within any process cap."""
    dev = torch.device(device)
    free, _total = torch.cuda.mem_get_info(dev)
    cap = memory_cap_bytes(device)
    if cap is None:
        return free
    return max(0, min(free, cap - torch.cuda.memory_reserved(dev)))
