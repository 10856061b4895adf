"""Render a video from an image and a prompt, with the model kept warm in this process.

Why: loading I2VGen-XL costs far more than one render, so the engine caches loaded
pipelines per process (the GPU task worker lives long; process workers start a process per run).
``render`` is a numbered list of steps in the diffusers style: check inputs, get the model,
seed, denoise, decode to frames (each decoded chunk handed to a ``FrameSink`` at once: the render
task's MP4 encoder, which then runs beside the decode). A CUDA out-of-memory error walks a short ladder:
free memory, retry once with model CPU offload, then fail with ``RenderOutOfMemory`` that
says what to lower.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import PIL.Image
import structlog
import torch

from infra.engine.feature_cache import feature_cache_of
from infra.engine.guidance_interval import steps_guided
from infra.engine.loader import EngineOptions, LoadedModel, free_memory, load_pipeline
from infra.engine.registry import NOISE_WARNING, ModelEntry, resolve_model
from infra.engine.speed import aot_fallbacks, attention_context, release_aot_packages

log = structlog.get_logger("i2vflow.engine")

# Allowed ranges of a request, checked before any model is touched.
MIN_SIZE, MAX_SIZE = 32, 2048
MIN_FRAMES, MAX_FRAMES = 1, 256
MIN_FPS, MAX_FPS = 1, 120
MIN_STEPS, MAX_STEPS = 1, 500
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 50.0
MAX_SEED = 2**63 - 1

_loads_in_process = 0  # real loads by any Engine in this process
_loads_lock = threading.Lock()


class RenderOutOfMemory(RuntimeError):
    """The GPU ran out of memory even after the fallback; the message says what to lower."""


class ModelUnavailable(RuntimeError):
    """This worker cannot load the model a request names (a name or folder it does not know,
    options its device cannot run). The operator's to fix, not the job's: deliberately not a
    ``ValueError``, which means a request the engine refuses."""


class FrameSink(Protocol):
    """Where a render's frames go as soon as they are decoded (the render task's MP4 encoder)."""

    def write(self, frames: np.ndarray) -> None:
        """Take the next (F, H, W, 3) uint8 frames."""

    def restart(self) -> None:
        """Forget every frame written: the render starts over (the out-of-memory fallback)."""


@dataclass
class RenderRequest:
    """What to render. Sizes are output pixels; ``model`` is a registry name, folder or hub id."""

    image: PIL.Image.Image
    prompt: str
    negative_prompt: str | None
    num_frames: int
    fps: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    seed: int
    model: str


@dataclass
class RenderResult:
    """Frames plus everything needed to explain them (which weights, where, how long)."""

    frames: np.ndarray  # uint8, shape (F, H, W, 3)
    model_name: str
    model_source: str
    is_noise: bool
    device: str
    dtype: str
    memory_mode: str
    seed: int
    load_seconds: float  # 0 when the model was already warm
    render_seconds: float
    model_loads_in_process: int
    pid: int
    oom_fallback_used: bool
    speed: dict = field(default_factory=dict)  # the speed levers this render ran with
    steps_run: int = 0  # denoising steps really run (``max_steps`` may cap the request's)
    steps_guided: int = 0  # of those, steps with classifier-free guidance (``guidance_interval`` may skip some)
    steps_cached: int = 0  # of those, steps on the deep features of an earlier one (``feature_cache_interval``)
    wait_seconds: float = 0.0  # queued behind another render of this process (a GPU worker's staged job)


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"`{name}` must be an integer in [{low}, {high}] but is {value!r}")


def check_inputs(request: RenderRequest) -> None:
    """Raise a ``ValueError`` naming the first field outside its allowed range.

    Why before loading: a bad job must fail in milliseconds with a message a person can act
    on, not after a minute of model loading with a tensor shape error.
    """
    if not isinstance(request.image, PIL.Image.Image):
        raise ValueError(f"`image` must be a PIL.Image.Image but is {type(request.image)}")
    if not isinstance(request.prompt, str):
        raise ValueError(f"`prompt` must be a string but is {type(request.prompt)}")
    if request.negative_prompt is not None and not isinstance(request.negative_prompt, str):
        raise ValueError(
            f"`negative_prompt` must be a string or None but is {type(request.negative_prompt)}"
        )
    for name in ("width", "height"):
        value = getattr(request, name)
        _check_int(name, value, MIN_SIZE, MAX_SIZE)
        if value % 8 != 0:
            raise ValueError(f"`{name}` must be a multiple of 8 (and even) but is {value}")
    _check_int("num_frames", request.num_frames, MIN_FRAMES, MAX_FRAMES)
    _check_int("fps", request.fps, MIN_FPS, MAX_FPS)
    _check_int("steps", request.steps, MIN_STEPS, MAX_STEPS)
    _check_int("seed", request.seed, 0, MAX_SEED)
    guidance = request.guidance_scale
    if (
        isinstance(guidance, bool)
        or not isinstance(guidance, int | float)
        or not MIN_GUIDANCE <= guidance <= MAX_GUIDANCE
    ):
        raise ValueError(
            f"`guidance_scale` must be a number in [{MIN_GUIDANCE}, {MAX_GUIDANCE}] "
            f"but is {guidance!r}"
        )
    if not isinstance(request.model, str) or not request.model.strip():
        raise ValueError(f"`model` must be a non-empty string but is {request.model!r}")


def frames_to_uint8(frames: np.ndarray) -> np.ndarray:
    """Pipeline output (1, F, H, W, 3) floats in [0, 1] -> (F, H, W, 3) uint8."""
    array = np.asarray(frames)
    if array.ndim == 5:
        array = array[0]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected frames shaped (F, H, W, 3) but got {array.shape}")
    return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)


def video_to_uint8(video: torch.Tensor) -> np.ndarray:
    """Postprocessed video (1, F, 3, H, W) floats in [0, 1], on any device -> (F, H, W, 3) uint8
    on the host: ``frames_to_uint8``'s rounding (half to even, float32), done where the video is,
    so only the uint8 frames cross to the host and the CPU does no per-pixel work."""
    if video.ndim != 5 or video.shape[0] != 1 or video.shape[2] != 3:
        raise ValueError(f"expected a video shaped (1, F, 3, H, W) but got {tuple(video.shape)}")
    scaled = torch.round(video[0].float() * 255.0).clamp_(0, 255).to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def out_of_memory_message(request: RenderRequest, loaded: LoadedModel) -> str:
    """Explain an OOM with the request's size and what to lower, in that order of effect."""
    advice = "Lower width/height or num_frames"
    if loaded.memory_mode != "offload":
        advice += ", or set I2VFLOW_MEMORY_MODE=offload (or keep I2VFLOW_OOM_FALLBACK=true)"
    return (
        f"Out of GPU memory rendering {request.width}x{request.height}, "
        f"{request.num_frames} frames with model {loaded.entry.name!r} on {loaded.device} "
        f"(memory_mode={loaded.memory_mode}). {advice}."
    )


class Engine:
    """Renders videos; keeps up to ``max_models`` loaded pipelines warm in this process.

    Cache key: (weights source, options). ``max_models`` defaults to 1 because a GPU rarely
    holds two video models: switching model evicts the previous one. One render at a time
    (a lock), since they would compete for the same device anyway.
    """

    def __init__(
        self,
        options: EngineOptions | None = None,
        model_cache: Path | None = None,
        max_models: int = 1,
    ) -> None:
        self.options = options or EngineOptions()
        self.options.check()
        self._model_cache = model_cache
        self.max_models = max(1, max_models)
        self._models: OrderedDict[tuple[str, EngineOptions], LoadedModel] = OrderedDict()
        self._lock = threading.RLock()

    @property
    def model_cache(self) -> Path:
        """Where locally built weights live; defaults to ``I2VFLOW_MODEL_CACHE``."""
        if self._model_cache is None:
            from infra.settings import get_settings

            self._model_cache = get_settings().model_cache
        return self._model_cache

    def warm(self, model: str, warmup: RenderRequest | None = None) -> LoadedModel:
        """Load ``model`` now (worker start-up) so the first job does not pay for it.

        ``warmup``: a request rendered once here, so compilation (and CUDA graph capture)
        for its shape happens at start-up, not inside the first job. Its steps do not
        matter for compilation (2 are enough); width, height and frames do.
        """
        with self._lock:
            loaded = self._get_model(resolve_model(model, self.model_cache))[0]
        if warmup is not None:
            start = time.perf_counter()
            self.render(replace(warmup, model=model))
            if loaded.speed.guidance_interval is not None:
                # Steps outside the interval call the UNet with one half: its own compiled graph. An
                # unguided first step has that call's signature (later ones pass permuted latents).
                self.render(replace(warmup, model=model, guidance_scale=1.0, steps=1))
            log.info("model.warmed", model=model, seconds=round(time.perf_counter() - start, 3))
        return loaded

    def render(self, request: RenderRequest, sink: FrameSink | None = None) -> RenderResult:
        """Render ``request`` to uint8 frames; same request and seed give the same frames.
        ``sink`` gets them too, chunk by chunk as they are decoded."""
        # 1. Check inputs
        check_inputs(request)
        queued = time.perf_counter()
        with self._lock:
            wait_seconds = time.perf_counter() - queued
            # 2. Get the model (loaded once per process and kept warm)
            entry, loaded, load_seconds = self._model_for(request.model)
            if entry.is_noise:
                log.warning("model.noise_weights", model=entry.name, warning=NOISE_WARNING)
            start = time.perf_counter()
            # 3-5. Seed, denoise, decode to frames (with the OOM ladder around them)
            frames = self._attempt(loaded, request, sink)
            fallback_used = frames is None
            if frames is None:
                message = out_of_memory_message(request, loaded)
                if not self.options.oom_fallback or loaded.memory_mode == "offload":
                    raise RenderOutOfMemory(message)
                loaded = None  # type: ignore[assignment]  # let the GPU copy be freed
                loaded, reload_seconds = self._reload_offloaded(entry)
                load_seconds += reload_seconds
                start = time.perf_counter()
                frames = self._attempt(loaded, request, sink)
                if frames is None:
                    raise RenderOutOfMemory(out_of_memory_message(request, loaded))
            result = self._result(request, loaded, frames, load_seconds, start, fallback_used)
            return replace(result, wait_seconds=round(wait_seconds, 3))

    def _model_for(self, model: str) -> tuple[ModelEntry, LoadedModel, float]:
        """The request's model, warm; what this worker cannot load raises ``ModelUnavailable``."""
        try:
            entry = resolve_model(model, self.model_cache)
            return (entry, *self._get_model(entry))
        except ValueError as exc:
            raise ModelUnavailable(f"this worker cannot load model {model!r}: {exc}") from exc

    def _attempt(self, loaded: LoadedModel, request: RenderRequest, sink: FrameSink | None) -> np.ndarray | None:
        """Run steps 3-5 once; ``None`` means CUDA ran out of memory (already freed, and the
        sink told to forget what it got: the decode may have run out half way).

        The OOM is handled outside the ``except`` block: its traceback pins the frames that
        hold the activations, and ``empty_cache`` cannot free them while it is alive.
        """
        try:
            return self._run_pipeline(loaded, request, sink)
        except torch.OutOfMemoryError:
            pass
        if sink is not None:
            sink.restart()
        free_memory()
        log.warning(
            "render.out_of_memory",
            width=request.width,
            height=request.height,
            num_frames=request.num_frames,
            memory_mode=loaded.memory_mode,
        )
        return None

    def _run_pipeline(self, loaded: LoadedModel, request: RenderRequest, sink: FrameSink | None) -> np.ndarray:
        """Steps 3-5: seed every RNG, denoise, decode to uint8 frames."""
        # 3. Seed: the global RNG too, because vae.encode(...).sample() ignores the generator
        torch.manual_seed(request.seed)
        generator = torch.Generator(device=loaded.device).manual_seed(request.seed)
        chunk = self.options.decode_chunk_size or (
            1 if loaded.device.startswith("cuda") else request.num_frames
        )
        # No autograd: the pipeline's own call turns it off inside, but the decode below runs outside
        # that call and would keep every VAE activation for a backward pass (+3 GiB at 512x16, eager).
        with torch.no_grad(), attention_context(loaded.speed):
            # 4. Denoise: the pipeline up to its latents
            latents = self._denoise(loaded, request, generator)
            # 5. Decode, chunk by chunk, to uint8 frames
            return self._decode(loaded, latents, chunk, sink)

    @staticmethod
    def _denoise(loaded: LoadedModel, request: RenderRequest, generator: torch.Generator) -> torch.Tensor:
        return loaded.pipeline(
            prompt=request.prompt,
            image=request.image.convert("RGB"),
            negative_prompt=request.negative_prompt,
            height=request.height,
            width=request.width,
            num_frames=request.num_frames,
            target_fps=request.fps,
            num_inference_steps=loaded.speed.steps_for(request.steps),
            guidance_scale=request.guidance_scale,
            generator=generator,
            output_type="latent",
        ).frames

    @staticmethod
    def _decode(loaded: LoadedModel, latents: torch.Tensor, chunk: int, sink: FrameSink | None) -> np.ndarray:
        """The pipeline's own decode (``decode_latents``, then its video processor), one chunk of
        frames at a time, each handed to ``sink`` as soon as it exists: an encoder fed this way
        is nearly done when the last frame is. The frames are those of the pipeline's own decode
        with the same chunk size."""
        pipeline = loaded.pipeline
        parts = []
        for first in range(0, latents.shape[2], chunk):
            video = pipeline.decode_latents(latents[:, :, first:first + chunk], decode_chunk_size=chunk)
            frames = video_to_uint8(pipeline.video_processor.postprocess_video(video=video, output_type="pt"))
            if sink is not None:
                sink.write(frames)
            parts.append(frames)
        pipeline.maybe_free_model_hooks()  # as the pipeline's own decode ends: offloaded models go back
        return np.concatenate(parts)

    def _reload_offloaded(self, entry: ModelEntry) -> tuple[LoadedModel, float]:
        """Second rung of the OOM ladder: drop the GPU copy, reload with CPU offload.

        The offloaded model stays cached under the original key, so later jobs stay warm
        and do not hit the same wall again.
        """
        log.warning("render.oom_fallback", model=entry.name, memory_mode="offload")
        key = (entry.source, self.options)
        if key in self._models:
            self._drop(key)
        return self._load(entry, replace(self.options, memory_mode="offload"), key)

    def _drop(self, key: tuple[str, EngineOptions]) -> None:
        """Forget a loaded model and give its memory back, the weights AOT packages hold included."""
        dropped = self._models.pop(key)
        release_aot_packages(dropped.pipeline)
        del dropped
        free_memory()

    def close(self) -> None:
        """Drop every loaded model and give its memory back (the engine loads again if used)."""
        with self._lock:
            for key in list(self._models):
                self._drop(key)

    def _get_model(self, entry: ModelEntry) -> tuple[LoadedModel, float]:
        """Return the cached model (load seconds 0) or load it, evicting the oldest."""
        key = (entry.source, self.options)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key], 0.0
        return self._load(entry, self.options, key)

    def _load(
        self, entry: ModelEntry, options: EngineOptions, key: tuple[str, EngineOptions]
    ) -> tuple[LoadedModel, float]:
        global _loads_in_process
        while len(self._models) >= self.max_models:
            evicted_key = next(iter(self._models))
            log.info("model.evicted", source=evicted_key[0])
            self._drop(evicted_key)
        loaded = load_pipeline(entry, options)
        with _loads_lock:
            _loads_in_process += 1
        self._models[key] = loaded
        return loaded, loaded.load_seconds

    def _result(
        self,
        request: RenderRequest,
        loaded: LoadedModel,
        frames: np.ndarray,
        load_seconds: float,
        start: float,
        fallback_used: bool,
    ) -> RenderResult:
        render_seconds = time.perf_counter() - start
        log.info(
            "render.done",
            model=loaded.entry.name,
            frames=int(frames.shape[0]),
            width=request.width,
            height=request.height,
            steps=loaded.speed.steps_for(request.steps),
            seconds=round(render_seconds, 3),
        )
        return RenderResult(
            frames=frames,
            model_name=loaded.entry.name,
            model_source=loaded.entry.source,
            is_noise=loaded.entry.is_noise,
            device=loaded.device,
            dtype=loaded.dtype,
            memory_mode=loaded.memory_mode,
            seed=request.seed,
            load_seconds=load_seconds,
            render_seconds=render_seconds,
            model_loads_in_process=model_loads_in_process(),
            pid=os.getpid(),
            oom_fallback_used=fallback_used,
            speed=loaded.speed.as_dict() | {"aot_fallbacks": aot_fallbacks(loaded.pipeline)},
            steps_run=loaded.speed.steps_for(request.steps),
            steps_guided=_steps_guided(loaded),
            steps_cached=_steps_cached(loaded),
        )


def _steps_guided(loaded: LoadedModel) -> int:
    """Steps of the render just run that had classifier-free guidance (by the pipeline's own rule)."""
    if not loaded.pipeline.do_classifier_free_guidance:
        return 0
    scheduler = loaded.pipeline.scheduler
    return steps_guided(scheduler.timesteps, loaded.speed.guidance_interval, scheduler.config.num_train_timesteps)


def _steps_cached(loaded: LoadedModel) -> int:
    """Steps of the render just run that reused the deep features of an earlier step."""
    cache = feature_cache_of(loaded.pipeline)
    return 0 if cache is None else cache.steps_cached


def model_loads_in_process() -> int:
    """How many times any Engine in this process really loaded a model."""
    return _loads_in_process


_engines: dict[tuple[EngineOptions, Path | None], Engine] = {}
_engines_lock = threading.Lock()


def get_engine(options: EngineOptions | None = None, model_cache: Path | None = None) -> Engine:
    """The per-process Engine for these options: call it from every task, pay loading once."""
    key = (options or EngineOptions(), model_cache)
    with _engines_lock:
        if key not in _engines:
            _engines[key] = Engine(key[0], model_cache=model_cache)
        return _engines[key]
