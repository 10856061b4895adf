"""structlog set-up: one JSON line per event, on stdout, in a rotating file, and in Prefect.

Why through the stdlib logger ``i2vflow``: Prefect forwards records of loggers named in
``PREFECT_LOGGING_EXTRA_LOGGERS`` to the run's logs in the UI (with the task-run id filled in),
so the same records reach the console, the file and the UI. Inside a flow or task run the
flow-run and task-run ids are bound automatically; secrets are masked in the finished line.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import sys
from pathlib import Path
from typing import Any

import structlog

LOGGER_NAME = "i2vflow"
MASK = "**********"
_SECRET_KEYS = re.compile(r"(secret|password|passwd|token|authorization|access_key|api_key|auth_string)", re.I)
# Secrets that only ever live in the environment (the settings' own are registered when read).
_SECRET_ENV = ("I2VFLOW_S3_SECRET_KEY", "I2VFLOW_S3_ACCESS_KEY", "I2VFLOW_WEBHOOK_TOKEN",
               "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MINIO_ROOT_USER",
               "MINIO_ROOT_PASSWORD", "POSTGRES_PASSWORD", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING",
               "PREFECT_SERVER_API_AUTH_STRING")
# user:password@ in any URL (a database or S3 URL pasted into a setting or an error message).
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/:@\s\"']+:)[^@\s\"']+@", re.I)
_registered: set[str] = set()


def register_secret(*values: str | None) -> None:
    """Mask these values wherever they would appear in a log line from now on.

    For secrets that do not come from the environment: the settings file's, a Prefect Secret
    block's. Values under 4 characters are ignored (masking them would garble every line).
    """
    _registered.update(v for v in values if v and len(v) >= 4)


def _secret_values() -> list[str]:
    values = {v for name in _SECRET_ENV if len(v := os.environ.get(name, "")) >= 4} | _registered
    return sorted(values, key=len, reverse=True)  # a longer secret containing a shorter one goes first


def _mask_secret_keys(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """Mask values under secret-looking keys, at any depth."""
    return _masked(event)


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: MASK if isinstance(k, str) and _SECRET_KEYS.search(k) and v else _masked(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    return value


def scrub(text: str) -> str:
    """``text`` with every known secret value and URL password replaced by the mask."""
    for secret in _secret_values():
        text = text.replace(secret, MASK)
        escaped = json.dumps(secret)[1:-1]  # as it appears inside a JSON string
        if escaped != secret:
            text = text.replace(escaped, MASK)
    return _URL_PASSWORD.sub(rf"\g<1>{MASK}@", text)


class _ScrubbedJSONRenderer:
    """Render the event as one JSON line, then scrub it.

    Scrubbing the finished line, not the event's values, also catches secrets inside nested
    values, exception messages and tracebacks, whatever their type was before rendering.
    """

    def __init__(self) -> None:
        self._render = structlog.processors.JSONRenderer(sort_keys=False)

    def __call__(self, logger: Any, name: str, event: dict[str, Any]) -> str:
        return scrub(str(self._render(logger, name, event)))


def _prefect_context(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """Bind flow-run and task-run ids when the record is made inside a Prefect run."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:  # pragma: no cover - prefect is a dependency
        return event
    flow_ctx, task_ctx = FlowRunContext.get(), TaskRunContext.get()
    if flow_ctx and flow_ctx.flow_run:
        event.setdefault("flow_run_id", str(flow_ctx.flow_run.id))
    if task_ctx:
        event.setdefault("task_run_id", str(task_ctx.task_run.id))
        event.setdefault("flow_run_id", str(task_ctx.task_run.flow_run_id))
    return event


def configure_logging(log_file: Path | None = None, level: str = "INFO") -> None:
    """Route structlog through the stdlib logger ``i2vflow`` as JSON lines.

    Idempotent: a second call replaces the handlers instead of adding more.
    """
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _prefect_context,
            _mask_secret_keys,
            structlog.processors.format_exc_info,
            _ScrubbedJSONRenderer(),
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger(LOGGER_NAME)
    root.setLevel(level)
    root.propagate = False  # Prefect's handler is attached to this logger by name instead
    for handler in [h for h in root.handlers if getattr(h, "_i2vflow", False)]:
        root.removeHandler(handler)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(
            log_file, maxBytes=20 * 1024 * 1024, backupCount=5, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._i2vflow = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    extra = {n for n in os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").split(",") if n}
    os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = ",".join(sorted(extra | {LOGGER_NAME}))
