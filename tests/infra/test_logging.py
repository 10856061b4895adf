"""Log lines are JSON and never carry a secret: not nested, not in an exception, not in a URL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import structlog

from infra.logging import MASK, configure_logging, register_secret
from infra.settings import Settings


def logged_lines(log_file: Path) -> list[dict]:
    for handler in __import__("logging").getLogger("i2vflow").handlers:
        handler.flush()
    return [json.loads(line) for line in log_file.read_text().splitlines()]


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "i2vflow.log"
    configure_logging(path)
    return path


def test_an_environment_secret_is_masked_at_any_depth_and_in_tracebacks(
    log_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "env-secret-4f1c9a"
    monkeypatch.setenv("I2VFLOW_S3_SECRET_KEY", secret)
    log = structlog.get_logger("i2vflow.test")
    log.info("nested", detail={"endpoint": "s3.example", "note": f"signed with {secret}"}, items=[secret])
    try:
        raise ConnectionError(f"auth failed for key {secret}")
    except ConnectionError:
        log.exception("store.failed")
    text = log_file.read_text()
    assert secret not in text
    nested, failed = logged_lines(log_file)
    assert nested["detail"] == {"endpoint": "s3.example", "note": f"signed with {MASK}"}
    assert nested["items"] == [MASK]
    assert failed["event"] == "store.failed" and f"auth failed for key {MASK}" in failed["exception"]


def test_a_secret_from_the_settings_is_masked_whatever_its_source(log_file: Path) -> None:
    """A secret set in the settings file (here: passed to Settings) is in no environment variable."""
    Settings(s3_secret_key="file-secret-77aa21", webhook_token="hook-token-5e5e")
    structlog.get_logger("i2vflow.test").info("config", text="file-secret-77aa21 and hook-token-5e5e")
    (line,) = logged_lines(log_file)
    assert line["text"] == f"{MASK} and {MASK}"


def test_values_under_secret_looking_keys_are_masked_at_any_depth(log_file: Path) -> None:
    structlog.get_logger("i2vflow.test").info("settings", store={"s3_secret_key": "x1", "region": "eu"},
                                             webhook_token="t0", count_tokens=0)
    (line,) = logged_lines(log_file)
    assert line["store"] == {"s3_secret_key": MASK, "region": "eu"}
    assert line["webhook_token"] == MASK
    assert line["count_tokens"] == 0  # a falsy value under such a key says nothing and stays


def test_a_password_in_a_url_is_masked_user_and_host_stay(log_file: Path) -> None:
    url = "postgresql+asyncpg://prefect:hunter2-pw@db.internal:5432/prefect"
    structlog.get_logger("i2vflow.test").warning("server.unreachable", url=url, error=f"cannot reach {url}")
    (line,) = logged_lines(log_file)
    assert line["url"] == f"postgresql+asyncpg://prefect:{MASK}@db.internal:5432/prefect"
    assert "hunter2-pw" not in json.dumps(line)


def test_a_secret_with_json_escapes_is_masked_as_written(log_file: Path) -> None:
    secret = 'we"ird\\key-9b'
    register_secret(secret)
    structlog.get_logger("i2vflow.test").info("odd", value=f"key={secret}")
    assert '"we\\"ird\\\\key-9b"'[1:-1] not in log_file.read_text()
    (line,) = logged_lines(log_file)
    assert line["value"] == f"key={MASK}"


def test_short_values_are_not_registered(log_file: Path) -> None:
    """Masking a 3-character value would garble every line that happens to contain it."""
    register_secret("abc", None, "")
    structlog.get_logger("i2vflow.test").info("abc.event", value="abc")
    (line,) = logged_lines(log_file)
    assert line["event"] == "abc.event" and line["value"] == "abc"
