"""Shared fixtures: the tiny random-weight model, built once per test session, and an engine.

Why session scope: building takes ~1 s and loading ~0.1-3 s (first imports); every engine
test renders through the same real ``from_pretrained`` folder, never through the hub.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub: never the hub

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402

from infra.engine.engine import Engine, RenderRequest  # noqa: E402
from infra.engine.loader import EngineOptions  # noqa: E402
from infra.engine.tiny import build_tiny_i2vgenxl  # noqa: E402

TINY_DIR_NAME = "tiny-i2vgen-xl"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache holding the tiny model, built once for the whole session."""
    cache = tmp_path_factory.mktemp("models")
    build_tiny_i2vgenxl(cache / TINY_DIR_NAME)
    return cache


@pytest.fixture(scope="session")
def tiny_dir(model_cache: Path) -> Path:
    return model_cache / TINY_DIR_NAME


@pytest.fixture(scope="session")
def engine(model_cache: Path) -> Engine:
    """One CPU engine for the session, like one long-lived GPU task worker."""
    return Engine(EngineOptions(device="cpu"), model_cache=model_cache)


@pytest.fixture(scope="session")
def image() -> PIL.Image.Image:
    """A deterministic, non-square RGB gradient (the pipeline crops it to the target shape)."""
    y, x = np.mgrid[0:80, 0:96]
    rgb = np.stack([x * 2, y * 3, (x + y) % 256], axis=-1).astype(np.uint8)
    return PIL.Image.fromarray(rgb)


@pytest.fixture
def make_request(image: PIL.Image.Image) -> Callable[..., RenderRequest]:
    """Build a small valid request (64x64, 8 frames, 2 steps); keywords override fields."""

    def make(**overrides: Any) -> RenderRequest:
        fields: dict[str, Any] = {
            "image": image,
            "prompt": "a lighthouse in a storm",
            "negative_prompt": None,
            "num_frames": 8,
            "fps": 8,
            "steps": 2,
            "guidance_scale": 9.0,
            "width": 64,
            "height": 64,
            "seed": 7,
            "model": "tiny",
        }
        fields.update(overrides)
        return RenderRequest(**fields)

    return make
