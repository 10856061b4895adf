"""Classifier-free guidance in a limited interval of noise levels (quality-trading, opt-in).

Why: with guidance every denoising step runs the UNet twice (batch 2: without and with the
prompt). Kynkäänniemi et al., "Applying Guidance in a Limited Interval Improves Sample and
Distribution Quality in Diffusion Models" (NeurIPS 2024), found guidance harmful at the highest
noise levels and nearly useless at the lowest. Outside ``[low, high]`` (noise level =
timestep / the scheduler's training timesteps: 1 is pure noise, 0 a clean image) this lever
runs the UNet on the prompt's half alone, so that step costs about half. The pipeline's own
guidance then yields the conditional prediction exactly (``uncond + g * (cond - uncond)`` with
``uncond == cond``).

How: two UNet hooks, no change to the pipeline's loop. The pre-hook keeps the second half of
every batched input (the pipeline concatenates ``[negative, positive]``); the forward hook
returns that half's prediction twice. Both stay outside ``torch.compile`` (a compiled UNet, or
an AOTInductor package, sees a batch-1 call: a second graph per shape, built at warm-up).

It changes the output: never in a preset; the benchmark reports its drift against stock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

# torch is imported where the hooks run: the settings check an interval without loading it.


def check_interval(interval: Sequence[float]) -> None:
    """Raise a precise ``ValueError`` unless ``interval`` is two noise levels, 0 <= low < high <= 1."""
    if len(interval) != 2:
        raise ValueError(f"`guidance_interval` must be two noise levels [low, high] but is {list(interval)}")
    low, high = interval
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"`guidance_interval` must satisfy 0 <= low < high <= 1 (noise levels: 1 is pure noise, "
                         f"0 a clean image) but is [{low}, {high}]")


def is_guided(timestep: Any, interval: Sequence[float], train_timesteps: int) -> bool:
    """Whether guidance runs at ``timestep``: its noise level within ``[low, high]``."""
    low, high = interval
    return low <= float(timestep) / train_timesteps <= high


def steps_guided(timesteps: Sequence[Any], interval: Sequence[float] | None, train_timesteps: int) -> int:
    """Of the steps a render ran (its scheduler's ``timesteps``), how many ran with guidance."""
    if interval is None:
        return len(timesteps)
    return sum(is_guided(t, interval, train_timesteps) for t in timesteps)


class GuidanceInterval:
    """The pair of UNet hooks; one instance per pipeline (renders of a pipeline never overlap)."""

    def __init__(self, pipeline: DiffusionPipeline, interval: Sequence[float]) -> None:
        check_interval(interval)
        self.pipeline = pipeline
        self.interval = tuple(interval)
        self.train_timesteps = int(pipeline.scheduler.config.num_train_timesteps)
        self.halved = False

    def keep_prompt_half(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Pre-hook: outside the interval, every input batched like the sample keeps its second half."""
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.halved = (self._pipeline_guides() and sample.shape[0] % 2 == 0
                       and not is_guided(timestep, self.interval, self.train_timesteps))
        if not self.halved:
            return None
        import torch

        batch = sample.shape[0]

        def half(value: Any) -> Any:
            is_batched = isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch
            return value[batch // 2:] if is_batched else value

        return tuple(half(a) for a in args), {name: half(value) for name, value in kwargs.items()}

    def _pipeline_guides(self) -> bool:
        try:
            return bool(self.pipeline.do_classifier_free_guidance)
        except AttributeError:  # a UNet called outside the pipeline's __call__
            return False

    def repeat_prediction(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        """Forward hook: the prompt half's prediction stands for both halves."""
        if not self.halved:
            return None
        import torch

        self.halved = False
        if isinstance(output, tuple):
            return (torch.cat([output[0], output[0]]), *output[1:])
        output.sample = torch.cat([output.sample, output.sample])
        return output


def use_guidance_interval(pipeline: DiffusionPipeline, interval: Sequence[float]) -> GuidanceInterval:
    """Hook ``pipeline.unet`` so guidance runs only within ``interval``; apply after the scheduler is final.

    The pre-hook goes first, so it reads the timestep before ``host_timesteps`` moves it to the GPU.
    Neither is traced by ``torch.compile``: their choice of batch is Python, made per call.
    """
    import torch

    hooks = GuidanceInterval(pipeline, interval)
    unet = pipeline.unet
    unet.register_forward_pre_hook(torch.compiler.disable(hooks.keep_prompt_half), with_kwargs=True, prepend=True)
    unet.register_forward_hook(torch.compiler.disable(hooks.repeat_prediction), with_kwargs=True)
    return hooks
