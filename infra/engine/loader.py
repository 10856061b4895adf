"""Load a pipeline onto a device: dtype, memory mode and the transformers>=5.6 shim.

Why a module of its own: loading is where hosts differ (CPU laptop, 24 GB card, H100) and
where the expensive decisions live. ``load_pipeline`` turns a ``ModelEntry`` plus
``EngineOptions`` into a ready ``LoadedModel`` and records what it chose, so every render
can report the device, dtype and memory mode it really ran with.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import structlog
import torch

from infra.engine import speed
from infra.engine.registry import ModelEntry
from infra.engine.speed import SpeedPlan

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

log = structlog.get_logger("i2vflow.engine")

DEVICES = ("auto", "cpu", "cuda")  # plus "cuda:N"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MEMORY_MODES = ("auto", "full", "slicing", "offload")
# Free GPU memory needed beyond the weights for "auto" to pick "full": activations of a
# 512x512x16 I2VGen-XL render peak ~2.4 GiB over the 4.9 GiB of fp16 weights.
ACTIVATION_HEADROOM_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class EngineOptions:
    """How to load and run models; hashable, because it is part of the engine's cache key.

    Extend with new speed levers (``torch.compile``, attention backend...) as new fields
    WITH defaults, so existing callers and cache keys keep working.
    ``decode_chunk_size``: frames the VAE decodes at once; ``None`` means auto (1 on CUDA,
    where larger chunks double memory for no speed-up; all frames on CPU).

    Speed levers (``infra/engine/speed.py``, measured in docs/performance.md):
    ``preset``: ``auto`` (``fast`` on CUDA, ``stock`` elsewhere), ``stock`` or ``fast``.
    ``compile``, ``fuse_qkv``, ``channels_last``: ``None`` takes the preset's choice;
    ``compile`` is ``off`` or a ``torch.compile`` mode (always ``dynamic=False``).
    ``attention``: scaled-dot-product backend (``auto`` lets PyTorch pick).
    ``cudnn_benchmark``: let cuDNN time its convolution algorithms per shape (process-wide).
    ``compile_vae``: also compile the VAE decoder (only with ``compile`` on).
    ``compile_cache_dir``: persistent inductor caches (default ``I2VFLOW_COMPILE_CACHE`` or
    ``~/.cache/i2vflow/inductor``), so a worker's second start compiles from cache.
    ``compile_scope``: ``model`` (one graph) or ``blocks`` (each repeated block: faster warm-up).
    ``aot``: compile the UNet (and the VAE decoder with ``compile_vae``) ahead of time into
    AOTInductor packages in the compile cache, one per input shape: a later process loads them
    in seconds instead of re-tracing with Dynamo (``compile=default``, ``compile_scope=model``).
    ``short_attention``: temporal self-attention through a Triton kernel (CUDA only; ``None``
    takes the preset's choice).
    ``channels_last_group_norm``: the temporal GroupNorms' statistics read along channels-last
    memory (a Triton kernel) where a norm's input outgrows the L2 cache (CUDA, with
    ``channels_last`` and compilation only; ``None`` takes the preset's choice).
    ``channels_last_inputs``: every UNet ResNet block's input stored channels-last inside the
    compiled graph (with ``channels_last`` and compilation only; ``None`` takes the preset's choice:
    on in ``fast``).
    ``host_timesteps``: the scheduler's timesteps on the host, so no step waits for the GPU
    (``None`` takes the preset's choice).
    ``coordinate_descent_tuning``: inductor tunes each generated kernel by coordinate descent
    while compiling (CUDA; a first compile 2.5 times as long for 2.2% faster renders; off in
    every preset, ``None`` takes the preset's choice).
    ``fp8_linear``: the transformers' Linear layers in e4m3 (Ada/Hopper; changes numerics).
    ``gpu_memory_gb``: cap this process's GPU memory (emulates a smaller card; ``auto``
    memory mode then decides within the cap).
    ``scheduler``, ``max_steps``: quality-trading, opt-in only (``dpm++``; a cap on steps).
    ``guidance_interval``: quality-trading, opt-in only: ``(low, high)`` noise levels (timestep /
    training timesteps) where classifier-free guidance runs; elsewhere one UNet half per step.
    ``feature_cache_interval``: quality-trading, opt-in only: a full UNet step every N steps, the
    steps between only its outer level on the deep features kept from the last full one (DeepCache).
    """

    device: str = "auto"
    dtype: str = "auto"
    memory_mode: str = "auto"
    oom_fallback: bool = True
    decode_chunk_size: int | None = None
    preset: str = "auto"
    compile: str | None = None
    fuse_qkv: bool | None = None
    channels_last: bool | None = None
    attention: str = "auto"
    cudnn_benchmark: bool | None = None
    compile_vae: bool | None = None
    compile_cache_dir: str | None = None
    compile_scope: str = "model"
    aot: bool | None = None
    short_attention: bool | None = None
    channels_last_group_norm: bool | None = None
    channels_last_inputs: bool | None = None
    host_timesteps: bool | None = None
    coordinate_descent_tuning: bool | None = None
    fp8_linear: bool = False
    gpu_memory_gb: float | None = None
    scheduler: str = "default"
    max_steps: int | None = None
    guidance_interval: tuple[float, float] | None = None
    feature_cache_interval: int | None = None

    def check(self) -> None:
        """Raise a precise ``ValueError`` for an option outside its allowed values."""
        if self.device not in DEVICES and not _is_cuda_index(self.device):
            raise ValueError(
                f"`device` must be one of {DEVICES} or 'cuda:N' but is {self.device!r}"
            )
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(
                f"`dtype` must be 'auto' or one of {tuple(DTYPES)} but is {self.dtype!r}"
            )
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(
                f"`memory_mode` must be one of {MEMORY_MODES} but is {self.memory_mode!r}"
            )
        if self.decode_chunk_size is not None and self.decode_chunk_size < 1:
            raise ValueError(
                f"`decode_chunk_size` must be None or >= 1 but is {self.decode_chunk_size}"
            )
        speed.check_options(self)


@dataclass
class LoadedModel:
    """A pipeline ready to render, and the choices made while loading it."""

    pipeline: DiffusionPipeline
    entry: ModelEntry
    device: str
    dtype: str
    memory_mode: str
    load_seconds: float
    speed: SpeedPlan = field(default_factory=SpeedPlan)


def _is_cuda_index(device: str) -> bool:
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()


def resolve_device(device: str) -> str:
    """``auto`` means CUDA when present, else CPU; asking for absent CUDA is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"`device` {device!r} requested but CUDA is not available here")
    return device


def resolve_dtype(dtype: str, device: str, entry: ModelEntry) -> str:
    """``auto`` means the model's CUDA dtype on a GPU and float32 on CPU (fp16 CPU is slow)."""
    if dtype != "auto":
        return dtype
    return entry.default_dtype_cuda if device.startswith("cuda") else "float32"


def apply_text_model_shim(pipeline: DiffusionPipeline) -> None:
    """Give a flattened ``CLIPTextModel`` back its ``text_model.final_layer_norm``.

    Why: transformers>=5.6 flattened ``CLIPTextModel``; I2VGen-XL's ``encode_prompt`` still
    calls ``text_encoder.text_model.final_layer_norm`` (diffusers issues 14124, 13833).
    The alias points at the same module, so behaviour is unchanged. Only added when missing.
    """
    encoder = getattr(pipeline, "text_encoder", None)
    if encoder is None or hasattr(encoder, "text_model"):
        return
    if hasattr(encoder, "final_layer_norm"):
        encoder.text_model = SimpleNamespace(final_layer_norm=encoder.final_layer_norm)


def free_memory() -> None:
    """Drop unreachable tensors and hand cached CUDA blocks back (after OOM or eviction)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def weight_bytes(pipeline: DiffusionPipeline) -> int:
    """Bytes of all parameters and buffers of the pipeline's torch modules."""
    total = 0
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            tensors = [*component.parameters(), *component.buffers()]
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def choose_memory_mode(requested: str, device: str, pipeline: DiffusionPipeline) -> str:
    """Resolve ``auto`` and modes that make no sense on the device.

    CPU: everything already lives in RAM, so ``auto`` and ``offload`` mean ``full``.
    CUDA ``auto``: ``full`` when the free memory (within any per-process cap, see
    ``gpu_memory_gb``) holds the weights plus activation headroom, else ``offload`` (one
    component on the GPU at a time: slower, far smaller peak).
    """
    if not device.startswith("cuda"):
        if requested == "offload":
            log.warning("memory_mode.ignored", requested=requested, device=device, used="full")
        return "slicing" if requested == "slicing" else "full"
    if requested != "auto":
        return requested
    free = speed.usable_memory_bytes(device)
    needed = weight_bytes(pipeline) + ACTIVATION_HEADROOM_BYTES
    mode = "full" if free >= needed else "offload"
    log.info("memory_mode.auto", free_bytes=free, needed_bytes=needed, chosen=mode)
    return mode


def enable_slicing(pipeline: DiffusionPipeline) -> None:
    """Trade speed for peak memory: VAE slicing and tiling, attention slicing."""
    vae = getattr(pipeline, "vae", None)
    for method in ("enable_slicing", "enable_tiling"):
        if hasattr(vae, method):
            getattr(vae, method)()
    if hasattr(pipeline, "enable_attention_slicing"):
        pipeline.enable_attention_slicing()


def place_pipeline(pipeline: DiffusionPipeline, device: str, mode: str, oom_fallback: bool) -> str:
    """Put the pipeline on ``device`` in memory ``mode``; return the mode really used.

    If moving the whole pipeline to the GPU runs out of memory and ``oom_fallback`` is on,
    fall back to model CPU offload instead of failing the load.
    """
    if mode == "offload":
        pipeline.enable_model_cpu_offload(device=device)
        return mode
    if mode == "slicing":
        enable_slicing(pipeline)
    try:
        pipeline.to(device)
    except torch.OutOfMemoryError:
        if not oom_fallback:
            raise
        log.warning("model.load_oom_fallback", device=device, mode=mode, used="offload")
        pipeline.to("cpu")
        free_memory()
        pipeline.enable_model_cpu_offload(device=device)
        return "offload"
    return mode


def _from_pretrained(entry: ModelEntry, dtype: str) -> DiffusionPipeline:
    """Call the entry's pipeline class ``from_pretrained`` (hub id or local folder) on CPU."""
    import diffusers

    pipeline_class: Any = getattr(diffusers, entry.pipeline_class)
    # diffusers 0.42 renamed torch_dtype to dtype (torch_dtype warns, removal in 1.0).
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if entry.variant and dtype == "float16":
        kwargs["variant"] = entry.variant
    return pipeline_class.from_pretrained(entry.source, **kwargs)


def load_pipeline(entry: ModelEntry, options: EngineOptions) -> LoadedModel:
    """Load ``entry`` the way ``options`` ask and report the choices made.

    Steps: 1 check options, 2 resolve device and dtype, 3 ``from_pretrained``, 4 shim and
    quiet progress bars, 5 choose and apply the memory mode, 6 apply the speed levers.
    """
    # 1. Check options
    options.check()
    # 2. Resolve device and dtype
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device, entry)
    log.info("model.loading", model=entry.name, source=entry.source, device=device, dtype=dtype)
    if device.startswith("cuda"):
        speed.apply_memory_cap(device, options.gpu_memory_gb)
    start = time.perf_counter()
    # 3. Load weights (on CPU first; placement is step 5)
    pipeline = _from_pretrained(entry, dtype)
    # 4. Compatibility shim and quiet progress bars (logs, not tqdm, report progress)
    apply_text_model_shim(pipeline)
    pipeline.set_progress_bar_config(disable=True)
    # 5. Memory mode
    mode = choose_memory_mode(options.memory_mode, device, pipeline)
    mode = place_pipeline(pipeline, device, mode, options.oom_fallback)
    # 6. Speed levers (compilation itself happens lazily, at the first render of a shape)
    plan = speed.apply_plan(pipeline, speed.resolve_plan(options, device, mode))
    seconds = time.perf_counter() - start
    log.info(
        "model.loaded",
        model=entry.name,
        device=device,
        dtype=dtype,
        memory_mode=mode,
        speed=plan.preset,
        seconds=round(seconds, 3),
    )
    return LoadedModel(pipeline, entry, device, dtype, mode, seconds, plan)
