"""The sidecar's i2vflow version: the installed one, and never a failed job when the code runs
from a source checkout that was not installed (no package metadata)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import pytest

from tasks import publish


def test_the_installed_version_is_reported() -> None:
    assert publish.i2vflow_version() == version("i2vflow")


def test_a_checkout_without_metadata_reports_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_metadata(name: str) -> str:
        raise PackageNotFoundError(name)

    monkeypatch.setattr(publish, "version", no_metadata)
    assert publish.i2vflow_version() == "unknown (not installed)"
