"""Deep features reused across denoising steps (``feature_cache_interval``; quality-trading, opt-in).

Why: DeepCache (Ma, Fang and Wang, "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024)
observed that a UNet's deep features change little from one denoising step to the next, while
its outermost level (the full-resolution layers) carries the detail that does change. With an
interval of N, every N-th step runs the whole UNet and keeps the feature that enters its last up
block; the N - 1 steps between run only the outer level: the stem (embeddings, ``conv_in``,
``transformer_in``), the first down block and the last up block, on the kept feature. For
I2VGen-XL the skipped levels are most of a step's work, so a reused step costs a fraction of a
full one. The first step of every render is full.

How: two modules over the same UNet (same weights, nothing copied). ``DeepStep`` runs the whole
UNet and also returns the feature; ``ShallowStep`` takes it as an input. Both follow
``I2VGenXLUNet.forward`` stage by stage (a test holds ``DeepStep`` to diffusers' own forward,
bit for bit), so each can be compiled, or packaged ahead of time by the ``aot`` lever, like the
UNet itself: two graphs per shape, both built at a worker's warm-up (its 2-step render runs one
of each). ``FeatureCache`` stands in for the UNet's ``forward`` and picks one per call; the UNet's
hooks (``host_timesteps``, ``guidance_interval``) still run around it. A call whose inputs do not
match the kept feature (another batch, as ``guidance_interval``'s unguided steps have) runs full.

It changes the output: never in a preset; the benchmark reports its drift against stock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def check_interval(interval: int) -> None:
    """Raise a precise ``ValueError`` unless ``interval`` is a whole number of steps, 2 or more."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 2:
        raise ValueError(f"`feature_cache_interval` must be a whole number >= 2 (a full UNet step every N steps; "
                         f"unset turns it off) but is {interval!r}")


@dataclass
class Stem:
    """What every level of the UNet takes: the stem's output and the per-frame conditioning."""

    sample: torch.Tensor
    emb: torch.Tensor
    context: torch.Tensor
    num_frames: int


def stem(unet: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor | float | int, fps: torch.Tensor,
         image_latents: torch.Tensor, image_embeddings: torch.Tensor | None,
         encoder_hidden_states: torch.Tensor | None, cross_attention_kwargs: dict[str, Any] | None) -> Stem:
    """Steps 1-6 of ``I2VGenXLUNet.forward``: time and fps embeddings, the context (prompt, first
    frame's latents, image embedding), the image latents' temporal encoding, ``conv_in`` and
    ``transformer_in``."""
    batch_size, channels, num_frames, height, width = sample.shape
    # 1. time
    timesteps = timestep
    if not torch.is_tensor(timesteps):
        dtype = torch.float64 if isinstance(timesteps, float) else torch.int64
        timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
    elif len(timesteps.shape) == 0:
        timesteps = timesteps[None].to(sample.device)
    timesteps = timesteps.expand(sample.shape[0])
    t_emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype), None)
    # 2. fps
    fps = fps.expand(fps.shape[0])
    emb = t_emb + unet.fps_embedding(unet.time_proj(fps).to(dtype=unet.dtype))
    emb = emb.repeat_interleave(num_frames, dim=0, output_size=emb.shape[0] * num_frames)
    # 3. context: prompt, the first frame's latents, the image embedding
    context = torch.cat([sample.new_zeros(batch_size, 0, unet.config.cross_attention_dim), encoder_hidden_states],
                        dim=1)
    first = image_latents[:, :, :1, :]
    first = first.permute(0, 2, 1, 3, 4).reshape(first.shape[0] * first.shape[2], first.shape[1],
                                                 first.shape[3], first.shape[4])
    first = unet.image_latents_context_embedding(first)
    frames_, channels_, height_, width_ = first.shape
    context = torch.cat([context, first.permute(0, 2, 3, 1).reshape(frames_, height_ * width_, channels_)], dim=1)
    image_emb = unet.context_embedding(image_embeddings)
    image_emb = image_emb.view(-1, unet.config.in_channels, unet.config.cross_attention_dim)
    context = torch.cat([context, image_emb], dim=1)
    context = context.repeat_interleave(num_frames, dim=0, output_size=context.shape[0] * num_frames)
    # 4. image latents, encoded along time
    image_latents = image_latents.permute(0, 2, 1, 3, 4).reshape(
        image_latents.shape[0] * image_latents.shape[2], image_latents.shape[1],
        image_latents.shape[3], image_latents.shape[4])
    image_latents = unet.image_latents_proj_in(image_latents)
    image_latents = (image_latents[None, :].reshape(batch_size, num_frames, channels, height, width)
                     .permute(0, 3, 4, 1, 2).reshape(batch_size * height * width, num_frames, channels))
    image_latents = unet.image_latents_temporal_encoder(image_latents)
    image_latents = image_latents.reshape(batch_size, height, width, num_frames, channels).permute(0, 4, 3, 1, 2)
    # 5. conv_in, 6. transformer_in
    sample = torch.cat([sample, image_latents], dim=1)
    sample = sample.permute(0, 2, 1, 3, 4).reshape((sample.shape[0] * num_frames, -1) + sample.shape[3:])
    sample = unet.conv_in(sample)
    sample = unet.transformer_in(sample, num_frames=num_frames, cross_attention_kwargs=cross_attention_kwargs,
                                 return_dict=False)[0]
    return Stem(sample, emb, context, num_frames)


def down(block: torch.nn.Module, sample: torch.Tensor, at: Stem,
         cross_attention_kwargs: dict[str, Any] | None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One down block, called as ``I2VGenXLUNet.forward`` calls it."""
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=sample, temb=at.emb, encoder_hidden_states=at.context, num_frames=at.num_frames,
                     cross_attention_kwargs=cross_attention_kwargs)
    return block(hidden_states=sample, temb=at.emb, num_frames=at.num_frames)


def up(block: torch.nn.Module, sample: torch.Tensor, skips: tuple[torch.Tensor, ...], at: Stem,
       upsample_size: Any, cross_attention_kwargs: dict[str, Any] | None) -> torch.Tensor:
    """One up block, called as ``I2VGenXLUNet.forward`` calls it."""
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=sample, temb=at.emb, res_hidden_states_tuple=skips,
                     encoder_hidden_states=at.context, upsample_size=upsample_size, num_frames=at.num_frames,
                     cross_attention_kwargs=cross_attention_kwargs)
    return block(hidden_states=sample, temb=at.emb, res_hidden_states_tuple=skips, upsample_size=upsample_size,
                 num_frames=at.num_frames)


def head(unet: torch.nn.Module, sample: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Step 9 of ``I2VGenXLUNet.forward``: norm, activation, ``conv_out``, back to (batch, C, frames, H, W)."""
    sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))
    return sample[None, :].reshape((-1, num_frames) + sample.shape[1:]).permute(0, 2, 1, 3, 4)


class DeepStep(torch.nn.Module):
    """The whole UNet; returns the noise prediction and the feature entering its last up block."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, fps: torch.Tensor, image_latents: torch.Tensor,
                image_embeddings: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        unet = self.unet
        # Interpolation sizes are forced when the latents are not a multiple of the upsamplers' factor.
        forward_upsample_size = any(s % 2**unet.num_upsamplers != 0 for s in sample.shape[-2:])
        at = stem(unet, sample, timestep, fps, image_latents, image_embeddings, encoder_hidden_states,
                  cross_attention_kwargs)
        hidden, skips = at.sample, (at.sample,)
        for block in unet.down_blocks:
            hidden, res = down(block, hidden, at, cross_attention_kwargs)
            skips += res
        if unet.mid_block is not None:
            hidden = unet.mid_block(hidden, at.emb, encoder_hidden_states=at.context, num_frames=at.num_frames,
                                    cross_attention_kwargs=cross_attention_kwargs)
        for block in unet.up_blocks[:-1]:
            res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            upsample_size = skips[-1].shape[2:] if forward_upsample_size else None
            hidden = up(block, hidden, res, at, upsample_size, cross_attention_kwargs)
        feature = hidden
        hidden = up(unet.up_blocks[-1], hidden, skips, at, None, cross_attention_kwargs)
        return head(unet, hidden, at.num_frames), feature


class ShallowStep(torch.nn.Module):
    """The UNet's outer level on a kept deep feature: stem, first down block, last up block."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, feature: torch.Tensor, sample: torch.Tensor, timestep: torch.Tensor, fps: torch.Tensor,
                image_latents: torch.Tensor, image_embeddings: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                cross_attention_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        unet = self.unet
        at = stem(unet, sample, timestep, fps, image_latents, image_embeddings, encoder_hidden_states,
                  cross_attention_kwargs)
        last = unet.up_blocks[-1]
        # The skips the last up block takes are the stem's output and the first down block's
        # layers (not its downsampler's, which the next level takes; compiled, it is never run).
        _, res = down(unet.down_blocks[0], at.sample, at, cross_attention_kwargs)
        skips = (at.sample, *res)[:len(last.resnets)]
        hidden = up(last, feature, skips, at, None, cross_attention_kwargs)
        return head(unet, hidden, at.num_frames)


class FeatureCache:
    """Stands in for ``unet.forward``: a full step every ``interval`` steps, shallow ones between.

    One instance per pipeline (renders of a pipeline never overlap). A new render is seen by its
    timestep: within a render the timesteps fall, so one that does not starts over (full).
    """

    def __init__(self, unet: torch.nn.Module, interval: int) -> None:
        check_interval(interval)
        self.interval = interval
        self.deep, self.shallow = DeepStep(unet), ShallowStep(unet)
        self.feature: torch.Tensor | None = None
        self.since_full = 0
        self.last_timestep: float | None = None
        self.timestep: float | None = None  # this call's, read by ``note_timestep`` before it moves to the GPU
        self.steps_cached = 0  # of the render so far: steps that reused the kept feature

    def note_timestep(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """UNet pre-hook: keep this call's timestep as a host number (prepended, so before
        ``host_timesteps`` moves it to the GPU)."""
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.timestep = float(timestep)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, fps: torch.Tensor | None = None,
                 image_latents: torch.Tensor | None = None, image_embeddings: torch.Tensor | None = None,
                 encoder_hidden_states: torch.Tensor | None = None, timestep_cond: torch.Tensor | None = None,
                 cross_attention_kwargs: dict[str, Any] | None = None, return_dict: bool = True) -> Any:
        if timestep_cond is not None:
            raise ValueError("`feature_cache_interval` does not take `timestep_cond` (I2VGen-XL has no such embedding)")
        inputs = (sample, timestep, fps, image_latents, image_embeddings, encoder_hidden_states,
                  cross_attention_kwargs)
        new_render = self.last_timestep is None or self.timestep is None or self.timestep >= self.last_timestep
        self.last_timestep = self.timestep
        if new_render:
            self.steps_cached = 0
        reusable = (not new_render and self.feature is not None and self.since_full < self.interval - 1
                    and self.feature.shape[0] == sample.shape[0] * sample.shape[2])
        if reusable:
            self.since_full += 1
            self.steps_cached += 1
            prediction = self.shallow(self.feature, *inputs)
        else:
            self.since_full = 0
            prediction, self.feature = self.deep(*inputs)
        if not return_dict:
            return (prediction,)
        from diffusers.models.unets.unet_3d_condition import UNet3DConditionOutput

        return UNet3DConditionOutput(sample=prediction)


def use_feature_cache(pipeline: DiffusionPipeline, interval: int) -> FeatureCache:
    """Route ``pipeline.unet``'s calls through a ``FeatureCache``; apply after ``guidance_interval``
    and ``host_timesteps`` (its pre-hook goes first, to read the host timestep)."""
    unet = pipeline.unet
    cache = FeatureCache(unet, interval)
    unet.forward = cache
    unet.register_forward_pre_hook(torch.compiler.disable(cache.note_timestep), with_kwargs=True, prepend=True)
    return cache


def feature_cache_of(pipeline: DiffusionPipeline) -> FeatureCache | None:
    """The pipeline's ``FeatureCache``, if the lever is on."""
    unet = getattr(pipeline, "unet", None)
    found = getattr(unet, "__dict__", {}).get("forward")
    return found if isinstance(found, FeatureCache) else None
