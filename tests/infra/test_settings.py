"""Settings read from the environment: list fields as comma lists, and what a job may ask for."""

from __future__ import annotations

import pytest

from infra.settings import Settings


def test_job_models_is_a_comma_list_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("I2VFLOW_JOB_MODELS", " tiny, /models/i2vgen-xl-merged ,owner/name,")
    assert Settings().job_models == ["tiny", "/models/i2vgen-xl-merged", "owner/name"]


def test_a_job_may_ask_for_an_offered_model_or_the_services_own() -> None:
    settings = Settings(model="/models/house-style", job_models=["tiny"])
    assert settings.offers_model("tiny") and settings.offers_model("/models/house-style")
    assert not settings.offers_model("i2vgen-xl")  # registry name, but not offered here
    assert Settings().offers_model("i2vgen-xl") and not Settings().offers_model("ali-vilab/i2vgen-x")
