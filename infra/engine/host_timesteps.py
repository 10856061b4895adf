"""Keep the scheduler's timesteps on the host, so the denoising loop never waits for the GPU.

Why: the pipeline puts the timesteps on the GPU, and DDIM reads them back on every step (it
indexes its CPU table of alphas with CUDA timesteps and tests ``prev_timestep >= 0``): six host
syncs per step, 305 per 512x16 render (``bench_engine``'s host-syncs column), each of which
drains the launch queue. A lone render hardly notices (0.9% on H200), but in a GPU worker the
rendering thread shares the GIL with the previous job's result being stored and the next job
being staged; after a sync the GPU waits until the rendering thread runs again (H200: staged
renders 6.26 s with the syncs, 6.16 s without, 5.97 s unstaged). With the timesteps on the host
the scheduler's arithmetic runs on host scalars, the UNet gets each timestep copied without a
sync, and the CPU can queue work ahead of the GPU: 6 syncs per render remain. The arithmetic is
the same: same table, same float32 values, the same frames.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def keep_timesteps_on_host(pipeline: DiffusionPipeline) -> None:
    """Apply to ``pipeline`` after its scheduler is final (``scheduler=dpm++`` replaces it)."""
    scheduler = pipeline.scheduler
    set_timesteps = scheduler.set_timesteps

    def set_timesteps_on_host(*args: Any, device: Any = None, **kwargs: Any) -> None:
        set_timesteps(*args, device="cpu", **kwargs)

    scheduler.set_timesteps = set_timesteps_on_host
    pipeline.unet.register_forward_pre_hook(timestep_to_sample_device, with_kwargs=True)


def timestep_to_sample_device(
    module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """UNet pre-hook: a host timestep goes to the sample's device without a sync (a scalar
    from pageable memory is staged at once; the copy is ordered on the stream)."""
    sample = args[0] if args else kwargs["sample"]
    if len(args) > 1:
        args = (args[0], _to_device_of(args[1], sample), *args[2:])
    elif "timestep" in kwargs:
        kwargs = {**kwargs, "timestep": _to_device_of(kwargs["timestep"], sample)}
    return args, kwargs


def _to_device_of(timestep: Any, sample: torch.Tensor) -> Any:
    if isinstance(timestep, torch.Tensor) and timestep.device != sample.device:
        return timestep.to(sample.device, non_blocking=True)
    return timestep
