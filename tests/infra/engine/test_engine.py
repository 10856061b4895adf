"""Rendering with the tiny model on CPU: shapes, determinism, warm cache, input checks, OOM."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from infra.engine.engine import (
    Engine,
    ModelUnavailable,
    RenderOutOfMemory,
    RenderRequest,
    get_engine,
    model_loads_in_process,
)
from infra.engine.loader import EngineOptions

MakeRequest = Callable[..., RenderRequest]


def test_render_gives_uint8_frames_and_an_honest_account(
    engine: Engine, make_request: MakeRequest
) -> None:
    result = engine.render(make_request())

    assert result.frames.dtype == np.uint8
    assert result.frames.shape == (8, 64, 64, 3)
    assert result.frames.std() > 0  # noise, but not a blank video
    assert (result.model_name, result.is_noise) == ("tiny", True)
    assert (result.device, result.dtype, result.memory_mode) == ("cpu", "float32", "full")
    assert (result.seed, result.pid, result.oom_fallback_used) == (7, os.getpid(), False)
    assert result.render_seconds > 0


class RecordingSink:
    """The render task's MP4 writer as the engine sees it: chunks as they come, and restarts."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.restarts = 0

    def write(self, frames: np.ndarray) -> None:
        self.chunks.append(frames.copy())

    def restart(self) -> None:
        self.chunks, self.restarts = [], self.restarts + 1


@pytest.mark.parametrize("chunk", [None, 3])
def test_frames_are_the_pipelines_own_decode_handed_over_chunk_by_chunk(
    model_cache: Path, make_request: MakeRequest, chunk: int | None
) -> None:
    """The engine denoises with the pipeline and decodes its latents one chunk at a time (so the
    MP4 encoder gets frames while the rest decode): the frames must be exactly those of one
    plain pipeline call at the same chunk size, and the sink must get all of them, in order."""
    from infra.engine.engine import frames_to_uint8

    engine = Engine(EngineOptions(device="cpu", decode_chunk_size=chunk), model_cache=model_cache)
    request = make_request(seed=5)
    sink = RecordingSink()

    result = engine.render(request, sink)

    loaded = engine.warm(request.model)
    torch.manual_seed(request.seed)
    plain = loaded.pipeline(
        prompt=request.prompt, image=request.image.convert("RGB"), negative_prompt=request.negative_prompt,
        height=request.height, width=request.width, num_frames=request.num_frames, target_fps=request.fps,
        num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
        decode_chunk_size=chunk or request.num_frames, output_type="np",
        generator=torch.Generator("cpu").manual_seed(request.seed),
    ).frames
    np.testing.assert_array_equal(result.frames, frames_to_uint8(plain))
    assert [len(c) for c in sink.chunks] == ([3, 3, 2] if chunk else [8])
    np.testing.assert_array_equal(np.concatenate(sink.chunks), result.frames)
    assert sink.restarts == 0


def test_no_step_of_a_render_keeps_activations_for_a_backward_pass(engine: Engine, make_request: MakeRequest) -> None:
    """The weights require grad (``from_pretrained`` leaves them so); the pipeline's call turns
    autograd off inside, and the decode, which runs outside that call, must too: with autograd on,
    every VAE activation stays allocated until the frame is done (+3 GiB at 512x16 on a GPU)."""
    loaded = engine.warm(make_request().model)
    assert any(weight.requires_grad for weight in loaded.pipeline.vae.parameters())
    outputs: list[torch.Tensor] = []
    hooks = [module.register_forward_hook(lambda _m, _i, out: outputs.append(out))
             for module in (loaded.pipeline.unet.conv_out, loaded.pipeline.vae.decoder.conv_out)]
    try:
        engine.render(make_request(seed=4))
    finally:
        for hook in hooks:
            hook.remove()

    assert len(outputs) > 2  # the UNet's steps and the decoder's frames were seen
    assert [out.requires_grad for out in outputs] == [False] * len(outputs)


def test_same_seed_gives_identical_frames_and_another_seed_does_not(
    engine: Engine, make_request: MakeRequest
) -> None:
    first = engine.render(make_request(seed=123)).frames
    torch.rand(1000)  # disturb the global RNG between calls: the engine must reseed it
    second = engine.render(make_request(seed=123)).frames
    other = engine.render(make_request(seed=124)).frames

    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_two_renders_at_once_take_turns_and_match_lone_renders(engine: Engine, make_request: MakeRequest) -> None:
    """A GPU worker with two slots calls render from two threads: one waits for the other
    (and says how long), and neither output depends on the other (seeding is per render)."""
    import threading

    requests = [make_request(seed=11, steps=6), make_request(seed=12, steps=6)]
    alone = [engine.render(request) for request in requests]
    together: list[Any] = [None, None]
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, engine.render(requests[i])))
               for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    for lone, paired in zip(alone, together, strict=True):
        np.testing.assert_array_equal(lone.frames, paired.frames)
    first, second = sorted(together, key=lambda result: result.wait_seconds)
    assert first.wait_seconds < 0.5 * first.render_seconds
    assert second.wait_seconds >= 0.5 * first.render_seconds, "the second render did not wait its turn"
    assert all(result.wait_seconds == 0.0 for result in alone)


def test_non_square_size_and_negative_prompt(engine: Engine, make_request: MakeRequest) -> None:
    result = engine.render(
        make_request(width=96, height=48, num_frames=4, negative_prompt="blurry, dark")
    )

    assert result.frames.shape == (4, 48, 96, 3)


def test_model_loads_once_and_stays_warm(model_cache: Path, make_request: MakeRequest) -> None:
    engine = Engine(EngineOptions(device="cpu"), model_cache=model_cache)
    before = model_loads_in_process()

    results = [engine.render(make_request(seed=seed)) for seed in (1, 2, 3)]
    by_path = engine.render(make_request(model=str(model_cache / "tiny-i2vgen-xl")))

    assert model_loads_in_process() - before == 1
    assert results[0].load_seconds > 0
    assert [r.load_seconds for r in results[1:]] == [0.0, 0.0]
    assert by_path.load_seconds == 0.0  # same weights by folder path: same cached pipeline
    assert results[-1].model_loads_in_process == before + 1


def test_get_engine_is_one_engine_per_process_and_options() -> None:
    options = EngineOptions(device="cpu")

    assert get_engine(options) is get_engine(EngineOptions(device="cpu"))
    assert get_engine(options) is not get_engine(EngineOptions(device="cpu", dtype="bfloat16"))


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("width", 60, "multiple of 8"),
        ("height", 0, "[32, 2048]"),
        ("width", 64.0, "integer"),
        ("num_frames", 0, "[1, 256]"),
        ("fps", 0, "[1, 120]"),
        ("steps", 501, "[1, 500]"),
        ("guidance_scale", -1.0, "[0.0, 50.0]"),
        ("seed", -1, "[0, "),
        ("image", "cat.png", "PIL.Image.Image"),
        ("prompt", None, "string"),
        ("negative_prompt", 3, "string or None"),
        ("model", "", "non-empty"),
    ],
)
def test_check_inputs_names_the_field_and_range(
    engine: Engine, make_request: MakeRequest, field: str, value: Any, allowed: str
) -> None:
    before = model_loads_in_process()

    with pytest.raises(ValueError, match=f"`{field}`") as caught:
        engine.render(make_request(**{field: value}))

    assert allowed in str(caught.value)
    assert model_loads_in_process() == before  # refused before touching a model


@pytest.mark.parametrize("model", ["tiny-xl", "/srv/models/not-synced-yet"])
def test_a_model_this_worker_cannot_load_is_its_own_problem_not_the_requests(
    engine: Engine, make_request: MakeRequest, model: str
) -> None:
    """Not a ValueError (a request the engine refuses, final for the job): the operator can fix
    it, and the render task retries it as it retries missing weights."""
    expected = f"cannot load model '{model}'.*Registry names: i2vgen-xl, tiny"
    with pytest.raises(ModelUnavailable, match=expected) as caught:
        engine.render(make_request(model=model))
    assert not isinstance(caught.value, ValueError)


def _fail_first_unet_call_with_oom(engine: Engine, request: RenderRequest) -> None:
    """Fault injection: the next UNet forward of the warm pipeline raises a CUDA-style OOM."""
    loaded = engine.warm(request.model)

    def raise_oom(*_args: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")

    loaded.pipeline.unet.register_forward_pre_hook(raise_oom)


def test_out_of_memory_falls_back_to_a_reload_in_offload_mode(
    model_cache: Path, make_request: MakeRequest
) -> None:
    engine = Engine(EngineOptions(device="cpu"), model_cache=model_cache)
    request = make_request()
    expected = engine.render(request).frames
    _fail_first_unet_call_with_oom(engine, request)
    before = model_loads_in_process()

    result = engine.render(request)

    assert result.oom_fallback_used
    assert model_loads_in_process() == before + 1  # the OOM-ing copy was replaced
    assert result.load_seconds > 0
    np.testing.assert_array_equal(result.frames, expected)
    assert not engine.render(request).oom_fallback_used  # the reloaded model stays warm


def test_out_of_memory_in_the_decode_restarts_the_sink_before_the_fallback_renders_again(
    model_cache: Path, make_request: MakeRequest
) -> None:
    """The VAE decode is where a large video peaks: running out half way through it, the sink
    already holds the first chunks. It is told to forget them, so the video that comes out of
    the fallback holds each frame once."""
    engine = Engine(EngineOptions(device="cpu", decode_chunk_size=2), model_cache=model_cache)
    request = make_request()
    expected = engine.render(request).frames
    calls = 0

    def oom_on_the_third_chunk(*_args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")

    engine.warm(request.model).pipeline.vae.decoder.register_forward_pre_hook(oom_on_the_third_chunk)
    sink = RecordingSink()

    result = engine.render(request, sink)

    assert result.oom_fallback_used and sink.restarts == 1
    assert [len(c) for c in sink.chunks] == [2, 2, 2, 2]
    np.testing.assert_array_equal(np.concatenate(sink.chunks), expected)
    np.testing.assert_array_equal(result.frames, expected)


def test_out_of_memory_without_fallback_says_what_to_lower(
    model_cache: Path, make_request: MakeRequest
) -> None:
    engine = Engine(EngineOptions(device="cpu", oom_fallback=False), model_cache=model_cache)
    request = make_request()
    _fail_first_unet_call_with_oom(engine, request)

    with pytest.raises(RenderOutOfMemory) as caught:
        engine.render(request)

    message = str(caught.value)
    for needle in ("64x64", "8 frames", "width/height", "num_frames", "MEMORY_MODE=offload"):
        assert needle in message
    assert isinstance(caught.value, RuntimeError)
