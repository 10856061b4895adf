"""A GPU worker's engine options come from the environment: every speed setting reaches the
engine by its ``I2VFLOW_`` name, and a wrong value is refused with the field named."""

from __future__ import annotations

from collections.abc import Iterator

import pydantic
import pytest

from infra.settings import get_settings
from tasks.render import engine_options


@pytest.fixture(autouse=True)
def fresh_settings() -> Iterator[None]:
    """Settings are read once per process; these tests change the environment in between."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_speed_settings_reach_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"SPEED_PRESET": "fast", "COMPILE_SCOPE": "blocks", "COMPILE_AOT": "true",
                        "SHORT_ATTENTION": "false", "COORDINATE_DESCENT_TUNING": "true", "CHANNELS_LAST_INPUTS": "true",
                        "FP8_LINEAR": "true", "SCHEDULER": "dpm++", "MAX_STEPS": "25"}.items():
        monkeypatch.setenv(f"I2VFLOW_{name}", value)
    options = engine_options()
    assert (options.preset, options.compile_scope, options.short_attention, options.fp8_linear) == (
        "fast", "blocks", False, True)
    assert (options.scheduler, options.max_steps, options.aot) == ("dpm++", 25, True)
    assert options.coordinate_descent_tuning is True and options.channels_last_inputs is True
    options.check()


def test_unset_short_attention_leaves_the_choice_to_the_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("I2VFLOW_SHORT_ATTENTION", raising=False)
    assert engine_options().short_attention is None
    assert engine_options().aot is None
    assert engine_options().coordinate_descent_tuning is None
    assert engine_options().channels_last_inputs is None


def test_a_wrong_compile_scope_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("I2VFLOW_COMPILE_SCOPE", "layers")
    with pytest.raises(pydantic.ValidationError, match="compile_scope"):
        engine_options()
