"""``host_timesteps``: the scheduler keeps its timesteps on the host, the UNet still gets each one
on its own device, and the frames are the pipeline's own (same table, same arithmetic).

The point of the lever (no host sync per denoising step) shows only on a GPU: the benchmark
measures it there (docs/performance.md). Here the parts that decide it are checked for real:
the tiny pipeline on CPU, and the pre-hook with a sample on the meta device.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from infra.engine.engine import Engine, RenderRequest
from infra.engine.host_timesteps import timestep_to_sample_device
from infra.engine.loader import EngineOptions

MakeRequest = Callable[..., RenderRequest]


@pytest.mark.parametrize("scheduler", ["default", "dpm++"])
def test_frames_equal_the_pipelines_own_and_the_account_says_so(
        model_cache: Path, make_request: MakeRequest, scheduler: str) -> None:
    on = Engine(EngineOptions(device="cpu", host_timesteps=True, scheduler=scheduler), model_cache=model_cache)
    off = Engine(EngineOptions(device="cpu", scheduler=scheduler), model_cache=model_cache)
    request = make_request(steps=4, seed=3)

    kept, plain = on.render(request), off.render(request)

    np.testing.assert_array_equal(kept.frames, plain.frames)
    assert (kept.speed["host_timesteps"], plain.speed["host_timesteps"]) == (True, False)
    assert kept.steps_run == plain.steps_run == 4


def test_the_scheduler_ignores_a_device_for_its_timesteps(model_cache: Path) -> None:
    pipeline = Engine(EngineOptions(device="cpu", host_timesteps=True), model_cache=model_cache).warm("tiny").pipeline
    pipeline.scheduler.set_timesteps(10, device="meta")  # what the pipeline asks for on a GPU
    assert pipeline.scheduler.timesteps.device.type == "cpu" and len(pipeline.scheduler.timesteps) == 10


def test_a_host_timestep_reaches_the_unet_on_the_samples_device() -> None:
    sample, timestep = torch.empty(2, 4, device="meta"), torch.tensor(981)

    args, kwargs = timestep_to_sample_device(torch.nn.Identity(), (sample, timestep), {"fps": 8})
    assert args[0] is sample and args[1].device.type == "meta" and kwargs == {"fps": 8}

    args, kwargs = timestep_to_sample_device(torch.nn.Identity(), (sample,), {"timestep": timestep})
    assert args == (sample,) and kwargs["timestep"].device.type == "meta"

    same = torch.empty(1, device="meta")
    args, _ = timestep_to_sample_device(torch.nn.Identity(), (sample, same), {})
    assert args[1] is same  # already there: untouched
