"""The compose GPU worker keeps its compiled packages across container restarts: the compile
cache is a named volume the worker's user can write (without it every start recompiles for
minutes; docs/performance.md)."""

from __future__ import annotations

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "infra" / "deploy"


def test_the_gpu_worker_compile_cache_is_a_writable_named_volume() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    worker = compose["services"]["gpu-worker"]
    cache = worker["environment"]["I2VFLOW_COMPILE_CACHE"]
    mounts = dict(volume.split(":")[:2] for volume in worker["volumes"])  # volume -> path in the container
    assert mounts.get("compile-cache") == cache and "compile-cache" in compose["volumes"]
    assert worker["environment"]["PREFECT_API_URL"]  # the shared environment is still merged in
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"chown i2vflow /data {cache}" in dockerfile  # a new volume copies this ownership
