"""The Prometheus, alert and Grafana files refer only to metrics that exist, and the compose
file wires them. (The expressions themselves are exercised by Prometheus, not here.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

from infra import metrics

DEPLOY = Path(__file__).resolve().parents[2] / "infra" / "deploy"
METRIC = re.compile(r"\b(?:i2vflow|process)_[a-z0-9_]+")


def _exported() -> set[str]:
    metrics.register_gpu_worker_metrics(lambda: 0)
    names: set[str] = set()
    for family in REGISTRY.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    return names


def _exprs() -> list[str]:
    alerts = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    exprs = [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    return exprs + [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_every_metric_in_alerts_and_dashboard_is_exported() -> None:
    used = {name for expr in _exprs() for name in METRIC.findall(expr)}
    assert used - _exported() == set()
    assert {"i2vflow_gpu_memory_bytes", "i2vflow_failures_total", "i2vflow_end_to_end_seconds_bucket",
            "i2vflow_queue_depth", "i2vflow_model_loads_total"} <= used


def test_two_alert_rules_gpu_memory_and_failure_rate() -> None:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"][0]["rules"]
    by_name = {rule["alert"]: rule for rule in rules}
    assert set(by_name) == {"I2vflowGpuMemoryHigh", "I2vflowFailureRateHigh"}
    assert by_name["I2vflowGpuMemoryHigh"]["for"] == "5m" and "> 0.9" in by_name["I2vflowGpuMemoryHigh"]["expr"]


def test_compose_wires_prometheus_and_grafana_to_files_that_exist() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"prometheus", "grafana", "watcher", "gpu-worker"} <= set(services)
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), volume
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert jobs["i2vflow-watcher"]["dns_sd_configs"][0]["port"] == 9464
    assert jobs["i2vflow-gpu-worker"]["dns_sd_configs"][0]["port"] == 9465
    assert set(jobs["i2vflow-gpu-worker"]["dns_sd_configs"][0]["names"]) <= set(services)
