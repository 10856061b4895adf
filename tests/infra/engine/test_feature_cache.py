"""``feature_cache_interval`` on the tiny pipeline (CPU): the deep step is diffusers' own UNet
forward, bit for bit; a shallow step on the feature its deep step kept gives that step's own
prediction again; renders run a full step every N steps and say how many reused features; the
compiled and packaged paths build both graphs at warm-up and render as eager does.

Its point (most of a step's work skipped) shows on a GPU: the benchmark measures speed and drift
there (docs/performance.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from infra.engine.engine import Engine, RenderRequest
from infra.engine.feature_cache import DeepStep, FeatureCache, ShallowStep, feature_cache_of
from infra.engine.loader import EngineOptions
from infra.engine.speed import release_aot_packages, resolve_plan
from infra.settings import Settings

MakeRequest = Callable[..., RenderRequest]


def cached_engine(model_cache: Path, interval: int = 3, **options: Any) -> Engine:
    return Engine(EngineOptions(device="cpu", feature_cache_interval=interval, **options), model_cache=model_cache)


def first_unet_call(engine: Engine, request: RenderRequest) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The UNet and the inputs of the first call a render makes to it, as the pipeline passes them."""
    unet = engine.warm("tiny").pipeline.unet
    seen: list[dict[str, Any]] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not seen:
            seen.append({"sample": args[0].clone(), "timestep": args[1], **kwargs})

    handle = unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        engine.render(request)
    finally:
        handle.remove()
    inputs = seen[0]
    inputs.pop("return_dict", None)
    return unet, inputs


@contextmanager
def steps_taken(engine: Engine) -> Iterator[list[str]]:
    """Which of the cache's steps ran, call by call: "deep" or "shallow"."""
    cache = feature_cache_of(engine.warm("tiny").pipeline)
    assert cache is not None
    taken: list[str] = []
    handles = [cache.deep.register_forward_hook(lambda *_: taken.append("deep")),
               cache.shallow.register_forward_hook(lambda *_: taken.append("shallow"))]
    try:
        yield taken
    finally:
        for handle in handles:
            handle.remove()


def test_the_deep_step_is_the_unets_own_forward_and_a_shallow_step_on_its_feature_gives_it_again(
        engine: Engine, make_request: MakeRequest) -> None:
    unet, inputs = first_unet_call(engine, make_request())
    with torch.no_grad():
        stock = unet(**inputs, return_dict=False)[0]
        prediction, feature = DeepStep(unet)(**inputs)
        again = ShallowStep(unet)(feature, **inputs)
        elsewhere = ShallowStep(unet)(torch.zeros_like(feature), **inputs)

    assert torch.equal(prediction, stock)
    assert feature.shape[0] == inputs["sample"].shape[0] * inputs["sample"].shape[2]  # (batch x frames, C, h, w)
    assert torch.equal(again, stock)  # the skipped levels are exactly the kept feature's
    assert not torch.allclose(elsewhere, stock)  # and the shallow step does use it


def test_a_full_step_every_n_and_the_account_counts_the_others(model_cache: Path, make_request: MakeRequest) -> None:
    cached = cached_engine(model_cache, interval=3)
    with steps_taken(cached) as taken:
        first = cached.render(make_request(steps=7))
        second = cached.render(make_request(steps=7))

    pattern = ["deep", "shallow", "shallow"] * 2 + ["deep"]
    assert taken == pattern * 2  # a new render starts with a full step
    assert (first.steps_run, first.steps_cached, first.speed["feature_cache_interval"]) == (7, 4, 3)
    np.testing.assert_array_equal(first.frames, second.frames)
    plain = Engine(EngineOptions(device="cpu"), model_cache=model_cache).render(make_request(steps=7))
    assert plain.steps_cached == 0
    assert not np.array_equal(first.frames, plain.frames)  # a quality trade: the output changes


def test_a_call_of_another_batch_runs_full(model_cache: Path, make_request: MakeRequest) -> None:
    # guidance_interval (0.3, 0.7) runs DDIM's 6 steps at batches 1, 2, 2, 2, 1, 1: a kept feature
    # of the other batch cannot serve, so those steps run full.
    cached = cached_engine(model_cache, interval=2, guidance_interval=(0.3, 0.7))
    with steps_taken(cached) as taken:
        result = cached.render(make_request(steps=6))

    assert taken == ["deep", "deep", "shallow", "deep", "deep", "shallow"]
    assert (result.steps_cached, result.steps_guided) == (2, 3)


def test_compiled_it_renders_as_eager(model_cache: Path, make_request: MakeRequest) -> None:
    compiled = cached_engine(model_cache, compile="default", compile_cache_dir=str(model_cache / "ic-cache"))
    eager = cached_engine(model_cache)

    frames = compiled.render(make_request(steps=4)).frames

    difference = np.abs(frames.astype(int) - eager.render(make_request(steps=4)).frames).max()
    assert difference <= 2  # inductor's float rounding; a wrong feature would be another video


def test_warm_up_builds_both_packages_and_renders_from_them(
        model_cache: Path, make_request: MakeRequest, tmp_path: Path) -> None:
    engine = cached_engine(model_cache, compile="default", aot=True, compile_cache_dir=str(tmp_path))
    pipeline = engine.warm("tiny", warmup=make_request(steps=2)).pipeline
    cache = feature_cache_of(pipeline)
    assert isinstance(cache, FeatureCache)
    dispatchers = [cache.deep.forward, cache.shallow.forward]
    assert [d.compiled for d in dispatchers] == [1, 1]
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "aot").glob("*.pt2")) == ["deep", "shallow"]

    result = engine.render(make_request(steps=4))

    assert [d.compiled for d in dispatchers] == [1, 1] and result.speed["aot_fallbacks"] == []
    eager = cached_engine(model_cache).render(make_request(steps=4))
    assert np.abs(result.frames.astype(int) - eager.frames).max() <= 2
    # Dropping the model frees the weights both packages were handed (AOTInductor keeps its own references).
    release_aot_packages(pipeline)
    assert [d.handed for d in dispatchers] == [{}, {}]
    assert all(p.numel() == 0 for p in pipeline.unet.parameters())


def test_offload_skips_it_with_the_reason() -> None:
    plan = resolve_plan(EngineOptions(feature_cache_interval=3), "cuda", "offload")
    assert plan.feature_cache_interval is None
    assert "feature_cache_interval=3 (memory_mode=offload wraps the UNet)" in plan.skipped
    assert resolve_plan(EngineOptions(feature_cache_interval=3), "cpu", "full").feature_cache_interval == 3


@pytest.mark.parametrize("interval", [1, 0, -2, True])
def test_a_bad_interval_is_refused_with_the_rule(interval: int) -> None:
    with pytest.raises(ValueError, match=r"`feature_cache_interval` must be a whole number >= 2"):
        EngineOptions(feature_cache_interval=interval).check()


def test_the_setting_reads_the_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("I2VFLOW_FEATURE_CACHE_INTERVAL", "3")
    assert Settings().feature_cache_interval == 3
    monkeypatch.setenv("I2VFLOW_FEATURE_CACHE_INTERVAL", "1")
    with pytest.raises(ValueError, match="feature_cache_interval"):
        Settings()
