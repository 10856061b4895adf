"""Loading: real ``from_pretrained`` of the tiny folder, device/dtype/memory-mode choices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from infra.engine.loader import EngineOptions, load_pipeline, resolve_device, resolve_dtype
from infra.engine.registry import REGISTRY, resolve_model


def test_load_tiny_on_cpu_reports_its_choices_and_applies_the_shim(model_cache: Path) -> None:
    loaded = load_pipeline(resolve_model("tiny", model_cache), EngineOptions(device="auto"))

    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert loaded.device == expected_device
    if expected_device == "cpu":
        assert (loaded.dtype, loaded.memory_mode) == ("float32", "full")
    assert loaded.pipeline.unet.dtype == getattr(torch, loaded.dtype)
    encoder = loaded.pipeline.text_encoder
    assert encoder.text_model.final_layer_norm is encoder.final_layer_norm
    assert loaded.pipeline._progress_bar_config == {"disable": True}
    assert loaded.load_seconds > 0


@pytest.mark.parametrize(("requested", "expected"), [("offload", "full"), ("slicing", "slicing")])
def test_memory_modes_on_cpu(model_cache: Path, requested: str, expected: str) -> None:
    options = EngineOptions(device="cpu", memory_mode=requested)

    loaded = load_pipeline(resolve_model("tiny", model_cache), options)

    assert loaded.memory_mode == expected
    if expected == "slicing":
        assert loaded.pipeline.vae.use_slicing and loaded.pipeline.vae.use_tiling


@pytest.mark.parametrize(
    ("field", "value"),
    [("device", "gpu"), ("dtype", "float64"), ("memory_mode", "low"), ("decode_chunk_size", 0)],
)
def test_bad_options_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"`{field}`"):
        EngineOptions(**{field: value}).check()


def test_device_and_dtype_resolution() -> None:
    entry = REGISTRY["i2vgen-xl"]
    assert resolve_dtype("auto", "cuda", entry) == "float16"
    assert resolve_dtype("auto", "cuda:1", entry) == "float16"
    assert resolve_dtype("auto", "cpu", entry) == "float32"
    assert resolve_dtype("bfloat16", "cpu", entry) == "bfloat16"
    assert resolve_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("auto") == "cuda"
    else:
        assert resolve_device("auto") == "cpu"
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
