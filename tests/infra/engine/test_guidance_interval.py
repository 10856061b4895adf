"""``guidance_interval`` on the tiny pipeline (CPU): outside the interval a step runs the UNet on
the prompt's half alone and yields exactly the pipeline's own unguided prediction; inside, the
pipeline's own guidance; the account says how many steps were guided; warm-up builds both graphs.

Its point (half a UNet step's work outside the interval) shows on a GPU: the benchmark measures
speed and drift there (docs/performance.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from infra.engine.engine import Engine, RenderRequest
from infra.engine.guidance_interval import steps_guided
from infra.engine.loader import EngineOptions
from infra.settings import Settings

MakeRequest = Callable[..., RenderRequest]


@contextmanager
def unet_batches(engine: Engine) -> Iterator[list[tuple[int, int]]]:
    """(timestep, batch) of every UNet call, as the UNet itself receives it (after the lever's pre-hook)."""
    calls: list[tuple[int, int]] = []

    @torch.compiler.disable
    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append((int(timestep), (args[0] if args else kwargs["sample"]).shape[0]))

    handle = engine.warm("tiny").pipeline.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def test_steps_outside_the_interval_run_one_half_and_the_account_counts_the_guided(
        model_cache: Path, make_request: MakeRequest) -> None:
    engine = Engine(EngineOptions(device="cpu", guidance_interval=(0.3, 0.7)), model_cache=model_cache)
    with unet_batches(engine) as calls:
        result = engine.render(make_request(steps=6))

    # DDIM's six timesteps of 1000: 831 and 167, 1 lie outside [300, 700]
    assert calls == [(831, 1), (665, 2), (499, 2), (333, 2), (167, 1), (1, 1)]
    assert (result.steps_run, result.steps_guided) == (6, 3)
    assert result.speed["guidance_interval"] == (0.3, 0.7)
    plain = Engine(EngineOptions(device="cpu"), model_cache=model_cache)
    guided, unguided = plain.render(make_request(steps=6)), plain.render(make_request(steps=6, guidance_scale=1.0))
    assert not np.array_equal(result.frames, guided.frames)
    assert not np.array_equal(result.frames, unguided.frames)
    assert (guided.steps_guided, unguided.steps_guided) == (6, 0)


def test_with_no_step_inside_the_frames_are_the_pipelines_own_unguided_render(
        model_cache: Path, make_request: MakeRequest) -> None:
    never = Engine(EngineOptions(device="cpu", guidance_interval=(0.99, 1.0)), model_cache=model_cache)
    always = Engine(EngineOptions(device="cpu", guidance_interval=(0.0, 1.0)), model_cache=model_cache)
    plain = Engine(EngineOptions(device="cpu"), model_cache=model_cache)

    skipped = never.render(make_request(steps=4, guidance_scale=9.0))

    assert skipped.steps_guided == 0
    np.testing.assert_array_equal(skipped.frames, plain.render(make_request(steps=4, guidance_scale=1.0)).frames)
    guided = plain.render(make_request(steps=4)).frames
    np.testing.assert_array_equal(always.render(make_request(steps=4)).frames, guided)


def test_a_compiled_unet_gets_both_batches_and_renders_as_eager(model_cache: Path, make_request: MakeRequest) -> None:
    interval = (0.3, 0.7)
    compiled = Engine(EngineOptions(device="cpu", compile="default", guidance_interval=interval),
                      model_cache=model_cache)
    eager = Engine(EngineOptions(device="cpu", guidance_interval=interval), model_cache=model_cache)
    with unet_batches(compiled) as calls:
        frames = compiled.render(make_request(steps=6)).frames

    assert [batch for _, batch in calls] == [1, 2, 2, 2, 1, 1]
    difference = np.abs(frames.astype(int) - eager.render(make_request(steps=6)).frames).max()
    assert difference <= 2  # inductor's float rounding; a wrong half would be noise of another prompt


def test_warm_up_builds_the_half_batch_package_too(
        model_cache: Path, make_request: MakeRequest, tmp_path: Path) -> None:
    # Interval (0, 0.6): a 2-step warm-up's timesteps (501, 1) are both guided, so without the
    # unguided warm-up the first job would build the half-batch package.
    engine = Engine(EngineOptions(device="cpu", compile="default", aot=True, compile_cache_dir=str(tmp_path),
                                  guidance_interval=(0.0, 0.6)), model_cache=model_cache)
    dispatcher = engine.warm("tiny", warmup=make_request(steps=2)).pipeline.unet.forward
    assert dispatcher.compiled == 2 and not dispatcher.failures

    result = engine.render(make_request(steps=4))  # 751 unguided, 501, 251, 1 guided

    assert dispatcher.compiled == 2
    assert result.steps_guided == 3


@pytest.mark.parametrize("interval", [(0.7, 0.3), (0.5, 0.5), (-0.1, 0.5), (0.2, 1.5)])
def test_a_bad_interval_is_refused_with_the_rule(interval: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match=r"`guidance_interval` must satisfy 0 <= low < high <= 1"):
        EngineOptions(guidance_interval=interval).check()


def test_the_setting_reads_low_high_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("I2VFLOW_GUIDANCE_INTERVAL", "0.1, 0.9")
    assert Settings().guidance_interval == (0.1, 0.9)
    monkeypatch.setenv("I2VFLOW_GUIDANCE_INTERVAL", "0.9,0.1")
    with pytest.raises(ValueError, match="guidance_interval.*0 <= low < high <= 1"):
        Settings()
    monkeypatch.delenv("I2VFLOW_GUIDANCE_INTERVAL")
    assert Settings().guidance_interval is None


def test_steps_guided_counts_the_noise_levels_inside() -> None:
    timesteps = torch.tensor([901, 701, 501, 301, 101, 1])
    assert steps_guided(timesteps, (0.2, 0.8), 1000) == 3
    assert steps_guided(timesteps, None, 1000) == 6
    assert steps_guided(timesteps, (0.0, 1.0), 1000) == 6
