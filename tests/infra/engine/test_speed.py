"""Speed and quality-trading levers on the tiny model (CPU): what is opt-in stays opt-in, and a
quality trade runs what it says and says what it ran."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from infra.engine.aot import AotDispatcher
from infra.engine.engine import Engine, RenderRequest
from infra.engine.loader import EngineOptions
from infra.engine.speed import PRESETS, REGION_CLASSES, SpeedPlan, configure_inductor, resolve_plan

MakeRequest = Callable[..., RenderRequest]


@pytest.mark.parametrize("preset", ["auto", "stock", "fast"])
def test_quality_trading_is_never_part_of_a_preset(preset: str) -> None:
    for device in ("cpu", "cuda"):
        plan = resolve_plan(EngineOptions(preset=preset), device, "full")
        assert (plan.scheduler, plan.max_steps, plan.guidance_interval, plan.feature_cache_interval) == (
            "default", None, None, None)
        assert plan.steps_for(50) == 50
    assert all(p.scheduler == "default" and p.max_steps is None and p.guidance_interval is None
               and p.feature_cache_interval is None for p in PRESETS.values())


def test_dpm_solver_with_a_step_cap_runs_fewer_steps_and_says_so(model_cache: Path, make_request: MakeRequest) -> None:
    traded = Engine(EngineOptions(device="cpu", scheduler="dpm++", max_steps=3), model_cache=model_cache)
    loaded = traded.warm("tiny")
    unet_calls: list[int] = []
    hook = loaded.pipeline.unet.register_forward_hook(lambda *_: unet_calls.append(1))
    try:
        result = traded.render(make_request(steps=10, seed=5))
    finally:
        hook.remove()

    assert type(loaded.pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert len(unet_calls) == 3  # one UNet call per step (guidance is batched into it)
    assert result.steps_run == 3
    assert (result.speed["scheduler"], result.speed["max_steps"]) == ("dpm++", 3)
    np.testing.assert_array_equal(result.frames, traded.render(make_request(steps=10, seed=5)).frames)

    stock = Engine(EngineOptions(device="cpu"), model_cache=model_cache).render(make_request(steps=3, seed=5))
    assert stock.steps_run == 3 and stock.speed["scheduler"] == "default"
    assert not np.array_equal(result.frames, stock.frames)  # another sampler: another output


@pytest.mark.parametrize(("field", "value", "message"), [
    ("scheduler", "euler", "`scheduler` must be one of"),
    ("max_steps", 0, "`max_steps` must be None or >= 1"),
])
def test_bad_quality_options_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineOptions(**{field: value}).check()  # type: ignore[arg-type]


def test_gpu_only_levers_are_skipped_on_a_cpu_with_the_reason() -> None:
    plan = resolve_plan(EngineOptions(preset="fast", fp8_linear=True, compile="off"), "cpu", "full")
    assert (plan.short_attention, plan.fp8_linear, plan.compile_vae) == (False, False, False)
    reasons = " ".join(plan.skipped)
    assert "short_attention (CUDA only" in reasons and "fp8_linear (needs a CUDA GPU" in reasons
    assert plan.compile_scope == "model"  # no compilation: no scope to report


def gpu_with(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int]) -> None:
    """Pretend to be a host with Triton and a CUDA GPU of ``capability`` (none here: no CUDA)."""
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else found(name, *a))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_fast_on_cuda_plans_the_measured_levers(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_with(monkeypatch, (9, 0))
    plan = resolve_plan(EngineOptions(preset="auto"), "cuda", "full")
    assert (plan.compile, plan.compile_scope, plan.short_attention, plan.compile_vae, plan.aot) == (
        "default", "model", True, True, True)
    assert plan.fp8_linear is False and plan.skipped == ()
    assert plan.channels_last_group_norm is True  # the norms that outgrow the L2 cache, by size
    assert resolve_plan(EngineOptions(preset="fast", channels_last_group_norm=False), "cuda",
                        "full").channels_last_group_norm is False
    blocks = resolve_plan(EngineOptions(preset="auto", compile_scope="blocks"), "cuda", "full")
    assert (blocks.compile_scope, blocks.aot) == ("blocks", False)
    assert blocks.skipped == ("aot (packages whole models; compile_scope=blocks)",)
    off = resolve_plan(EngineOptions(preset="fast", short_attention=False), "cuda", "full")
    assert off.short_attention is False
    assert plan.host_timesteps is True and PRESETS["stock"].host_timesteps is False
    assert resolve_plan(EngineOptions(preset="fast", host_timesteps=False), "cuda", "full").host_timesteps is False


def test_the_group_norm_tiles_need_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    # A small card's offload mode runs the UNet eagerly: there the tiles would cost, not save.
    gpu_with(monkeypatch, (9, 0))
    offload = resolve_plan(EngineOptions(preset="fast"), "cuda", "offload")
    assert offload.channels_last_group_norm is False
    assert "channels_last_group_norm (needs compile: inductor fuses the normalisation)" in offload.skipped
    assert resolve_plan(EngineOptions(preset="fast"), "cuda", "full").channels_last_group_norm is True


def test_channels_last_inputs_is_on_in_fast_and_needs_compiled_channels_last(monkeypatch: pytest.MonkeyPatch) -> None:
    # On in `fast` since an H100 timed it: 2.1% at 512x16 (docs/performance.md).
    gpu_with(monkeypatch, (9, 0))
    assert resolve_plan(EngineOptions(preset="fast"), "cuda", "full").channels_last_inputs is True
    assert resolve_plan(EngineOptions(preset="stock"), "cuda", "full").channels_last_inputs is False
    turned_off = EngineOptions(preset="fast", channels_last_inputs=False)
    assert resolve_plan(turned_off, "cuda", "full").channels_last_inputs is False
    offload = resolve_plan(EngineOptions(preset="fast"), "cuda", "offload")
    assert offload.channels_last_inputs is False
    assert "channels_last_inputs (needs compile: it sets a layout inside compiled graphs)" in offload.skipped
    nchw = resolve_plan(EngineOptions(preset="fast", channels_last=False, channels_last_inputs=True), "cuda", "full")
    assert "channels_last_inputs (needs channels_last)" in nchw.skipped


def test_coordinate_descent_tuning_is_opt_in_for_compiled_cuda_models(monkeypatch: pytest.MonkeyPatch) -> None:
    # Off in every preset: a machine's first compile takes 2.5 times as long (docs/performance.md).
    gpu_with(monkeypatch, (9, 0))
    assert resolve_plan(EngineOptions(preset="fast"), "cuda", "full").coordinate_descent_tuning is False
    tuned = resolve_plan(EngineOptions(preset="fast", coordinate_descent_tuning=True), "cuda", "full")
    assert tuned.coordinate_descent_tuning is True and tuned.skipped == ()
    offload = resolve_plan(EngineOptions(preset="fast", coordinate_descent_tuning=True), "cuda", "offload")
    assert offload.coordinate_descent_tuning is False
    assert "coordinate_descent_tuning (needs compile)" in offload.skipped
    cpu = resolve_plan(EngineOptions(preset="fast", compile="default", coordinate_descent_tuning=True), "cpu", "full")
    assert cpu.compile == "default" and cpu.coordinate_descent_tuning is False
    assert "coordinate_descent_tuning (CUDA only: it tunes Triton kernels)" in cpu.skipped


def test_the_plan_owns_inductors_tuning_and_layout_switches() -> None:
    import torch._inductor.config as inductor_config

    from infra.engine.aot import module_fingerprint

    # The config's own patch, not pytest's monkeypatch: undoing that hides a torch config entry.
    with inductor_config.patch(coordinate_descent_tuning=True,  # as if the env var were set
                               force_layout_optimization=True):  # as if an earlier plan had set it
        module = torch.nn.Linear(2, 2)
        configure_inductor(SpeedPlan(compile="default"))
        assert inductor_config.coordinate_descent_tuning is False and inductor_config.force_layout_optimization is False
        plain_key = module_fingerprint(module)
        configure_inductor(SpeedPlan(compile="default", channels_last=True, coordinate_descent_tuning=True))
        assert inductor_config.coordinate_descent_tuning is True and inductor_config.force_layout_optimization is True
        assert module_fingerprint(module) != plain_key  # a tuned package never stands in for a plain one
        configure_inductor(SpeedPlan(compile="default"))
        assert module_fingerprint(module) == plain_key  # and a plain plan after it keys as a fresh process does


def test_bad_compile_scope_names_the_field() -> None:
    with pytest.raises(ValueError, match="`compile_scope` must be one of"):
        EngineOptions(compile_scope="layers").check()


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compile_scope_decides_what_is_compiled(model_cache: Path, scope: str) -> None:
    # Loading applies the plan; compilation itself is lazy (first call), so nothing compiles here.
    options = EngineOptions(device="cpu", preset="fast", aot=False, compile_scope=scope,
                            compile_cache_dir=str(model_cache / "ic"))
    pipeline = Engine(options, model_cache=model_cache).warm("tiny").pipeline
    def compiled(model: torch.nn.Module) -> set[str]:
        return {type(m).__name__ for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None}

    if scope == "model":
        assert compiled(pipeline.unet) == {"I2VGenXLUNet"}
    else:
        assert "ResnetBlock2D" in compiled(pipeline.unet) and compiled(pipeline.unet) <= set(REGION_CLASSES)
    assert compiled(pipeline.vae.decoder) == {"Decoder"}  # the decoder is compiled whole either way
    assert compiled(pipeline.vae.encoder) == set()


def test_aot_routes_the_unet_and_decoder_through_packages(model_cache: Path) -> None:
    options = EngineOptions(device="cpu", preset="fast", compile_cache_dir=str(model_cache / "ic"))
    pipeline = Engine(options, model_cache=model_cache).warm("tiny").pipeline
    assert isinstance(pipeline.unet.forward, AotDispatcher) and pipeline.unet.forward.name == "unet"
    assert isinstance(pipeline.vae.decoder.forward, AotDispatcher)
    assert getattr(pipeline.unet, "_compiled_call_impl", None) is None  # no Dynamo on this path


def test_short_attention_is_skipped_on_a_gpu_older_than_ampere(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_with(monkeypatch, (7, 5))  # a T4, say
    plan = resolve_plan(EngineOptions(preset="fast"), "cuda", "full")
    assert plan.short_attention is False
    assert plan.skipped == ("short_attention (needs compute capability 8.0 or newer, this GPU has 7.5)",)


def test_without_triton_a_gpu_runs_uncompiled_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else found(name, *a))
    plan = resolve_plan(EngineOptions(preset="fast"), "cuda", "full")
    assert (plan.compile, plan.compile_vae, plan.short_attention) == ("off", False, False)
    assert plan.skipped == ("compile=default (Triton is not installed)", "compile_vae (needs compile)",
                            "aot (needs compile)", "short_attention (Triton is not installed)",
                            "channels_last_group_norm (Triton is not installed)",
                            "channels_last_inputs (needs compile: it sets a layout inside compiled graphs)")
    assert plan.fuse_qkv and plan.channels_last  # the levers that need no compiler stay
