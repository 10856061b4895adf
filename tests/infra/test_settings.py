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


@pytest.mark.parametrize(("inbox", "outbox"), [
    ("data/inbox", "data/inbox"),
    ("data/inbox", "data/inbox/out"),  # the outbox inside the inbox
    ("data/io/outbox/in", "data/io/outbox"),  # the inbox inside the outbox
    ("data/inbox", "file://{cwd}/data/inbox/"),
    ("s3://assets", "s3://assets/outbox"),
    ("s3://assets/inbox/", "s3://assets//inbox"),
])
def test_an_outbox_overlapping_the_inbox_is_refused(inbox: str, outbox: str) -> None:
    """Sidecars are NAME.json: in the inbox they would overwrite the jobs' own NAME.json."""
    import os

    with pytest.raises(ValueError, match="overlap.*I2VFLOW_OUTBOX"):
        Settings(inbox=inbox, outbox=outbox.format(cwd=os.getcwd()))


@pytest.mark.parametrize(("inbox", "outbox"), [
    ("data/inbox", "data/outbox"),
    ("data/in", "data/inbox"),  # a shared name beginning is not nesting
    ("s3://assets/inbox", "s3://assets/outbox"),
    ("s3://assets/inbox", "s3://renders/inbox"),
    ("data/inbox", "s3://data/inbox"),
])
def test_separate_inbox_and_outbox_are_accepted(inbox: str, outbox: str) -> None:
    assert Settings(inbox=inbox, outbox=outbox).outbox == outbox


def test_every_setting_is_in_the_operations_reference() -> None:
    """docs/operations.md "All settings" is the operator's reference: a new field must land there too."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    reference = doc[doc.index("## All settings"):]
    missing = [name for name in Settings.model_fields if f"`I2VFLOW_{name.upper()}`" not in reference]
    assert missing == [], f"settings missing from docs/operations.md: {missing}"
