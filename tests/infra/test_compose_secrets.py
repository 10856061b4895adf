"""The compose file has no default for any secret: it refuses to start until each one is set."""

from __future__ import annotations

import re
from pathlib import Path

COMPOSE = Path(__file__).resolve().parents[2] / "infra" / "deploy" / "docker-compose.yml"
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET", re.I)


def test_every_secret_in_the_compose_file_is_required() -> None:
    references = re.findall(r"\$\{([A-Z0-9_]+)([^}]*)\}", COMPOSE.read_text())
    secrets = [(name, rest) for name, rest in references if SECRET_NAME.search(name)]
    assert {name for name, _ in secrets} >= {"MINIO_ROOT_PASSWORD", "POSTGRES_PASSWORD", "I2VFLOW_WEBHOOK_TOKEN",
                                             "GRAFANA_ADMIN_PASSWORD"}
    with_default = [f"${{{name}{rest}}}" for name, rest in secrets if not rest.startswith(":?")]
    assert with_default == [], f"secrets with a default or no check: {with_default}"
