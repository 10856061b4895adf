"""Process supervision for one host: one GPU worker per card, each bound to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.service import Supervisor, gpu_worker_bindings, start_gpu_worker


def test_one_gpu_worker_per_visible_gpu_by_default() -> None:
    assert gpu_worker_bindings(0, ["0", "1"]) == ["0", "1"]
    assert gpu_worker_bindings(0, ["2", "3"]) == ["2", "3"]  # CUDA_VISIBLE_DEVICES=2,3 is respected
    assert gpu_worker_bindings(1, ["0", "1"]) == ["0"]


def test_cpu_host_gets_unbound_workers() -> None:
    assert gpu_worker_bindings(0, []) == [None]
    assert gpu_worker_bindings(2, []) == [None, None]


def test_more_workers_than_gpus_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="I2VFLOW_GPU_WORKERS=3 but only 2 GPU"):
        gpu_worker_bindings(3, ["0", "1"])


def test_second_gpu_worker_is_bound_to_its_card_and_own_metrics_port(tmp_path: Path) -> None:
    sup = Supervisor(env={"PATH": "/usr/bin:/bin", "I2VFLOW_GPU_WORKER_METRICS_PORT": "9700",
                          "PREFECT_API_URL": "http://127.0.0.1:9/api"}, log_dir=tmp_path)
    try:
        child = start_gpu_worker(sup, 1, "1")
        environ = dict(item.split("=", 1) for item in
                       Path(f"/proc/{child.pid}/environ").read_text().split("\0") if "=" in item)
    finally:
        sup.stop()
    assert "gpu-worker-1" in {p.name.removesuffix(".log") for p in tmp_path.iterdir()}
    assert environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert environ["I2VFLOW_GPU_WORKER_METRICS_PORT"] == "9701"
    assert sup.env["I2VFLOW_GPU_WORKER_METRICS_PORT"] == "9700"  # the host's env is not changed


def test_deployments_run_in_the_checkout_with_no_pull_steps(service: object) -> None:
    """Flow runs run in their worker's working directory, which Supervisor makes the checkout,
    with no pull steps: Prefect's default pull step (set_working_directory to the deployer's
    folder) cost 0.1-0.17 s of each flow run's start."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        for name in ("generate-video/generate-video", "campaign/campaign"):
            deployment = client.read_deployment_by_name(name)
            assert not deployment.pull_steps, name
            assert deployment.job_variables["working_dir"] == ".", name
