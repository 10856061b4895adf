"""structlog set-up: one JSON line per event, on stdout, in a rotating file, and in Prefect.

Why through the stdlib logger ``i2vflow``: Prefect forwards records of loggers named in
``PREFECT_LOGGING_EXTRA_LOGGERS`` to the run's logs in the UI (with the task-run id filled in),
so the same records reach the console, the file and the UI. Inside a flow or task run the
flow-run and task-run ids are bound automatically; secrets are redacted before rendering.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
from pathlib import Path
from typing import Any

import structlog

LOGGER_NAME = "i2vflow"
_SECRET_KEYS = re.compile(r"(secret|password|passwd|token|authorization|access_key|api_key)", re.I)
_SECRET_ENV = ("I2VFLOW_S3_SECRET_KEY", "I2VFLOW_S3_ACCESS_KEY", "I2VFLOW_WEBHOOK_TOKEN",
               "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MINIO_ROOT_PASSWORD",
               "AWS_SESSION_TOKEN", "PREFECT_API_KEY")


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """Mask values under secret-looking keys, and any known secret value anywhere."""
    secrets = [v for name in _SECRET_ENV if len(v := os.environ.get(name, "")) >= 4]
    for key, value in list(event.items()):
        if _SECRET_KEYS.search(key) and value:
            event[key] = "**********"
        elif isinstance(value, str):
            for secret in secrets:
                value = value.replace(secret, "**********")
            event[key] = value
    return event


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
            _redact,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
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
