"""Pruning Prefect's local result storage on a real folder, with real file ages."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from infra.results import RECORD_START, ResultPruner, prune_results, start_result_pruner
from infra.settings import Settings
from tests.helpers import wait_for


def _file(path: Path, size: int, age_seconds: float, content: bytes = RECORD_START) -> Path:
    """A file of ``size`` bytes, a result record unless ``content`` says otherwise, last written
    ``age_seconds`` ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content + b"x" * (size - len(content)))
    then = time.time() - age_seconds
    os.utime(path, (then, then))
    return path


def test_files_older_than_the_ttl_go_and_newer_ones_stay(tmp_path: Path) -> None:
    old_frames = _file(tmp_path / "4348c8456f292bbd", 3000, age_seconds=7300)
    old_parameters = _file(tmp_path / "parameters" / "455c8d70", 500, age_seconds=8000)
    fresh_frames = _file(tmp_path / "743ed30c92f3ea78", 2000, age_seconds=60)
    fresh_parameters = _file(tmp_path / "parameters" / "d1e0a117", 100, age_seconds=7100)

    assert prune_results(tmp_path, older_than_seconds=7200) == (2, 3500)

    assert not old_frames.exists() and not old_parameters.exists()
    assert fresh_frames.exists() and fresh_parameters.exists()
    assert prune_results(tmp_path, older_than_seconds=7200) == (0, 0)


def test_records_as_prefect_writes_them_are_recognised(tmp_path: Path) -> None:
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    record = ResultRecord(result={"job": "shoe"}, metadata=ResultRecordMetadata(serializer=PickleSerializer(),
                                                                                 storage_key="parameters/1"))
    written = _file(tmp_path / "parameters" / "1", 0, age_seconds=9000, content=record.serialize())
    assert prune_results(tmp_path, older_than_seconds=7200)[0] == 1
    assert not written.exists()


def test_only_result_records_are_deleted(tmp_path: Path) -> None:
    """PREFECT_LOCAL_STORAGE_PATH pointed at a folder that holds other things: those stay."""
    notes = _file(tmp_path / "notes.txt", 100, age_seconds=90_000, content=b"shopping list")
    lock = _file(tmp_path / "4348c8456f292bbd.lock", 10, age_seconds=90_000, content=b"")
    record = _file(tmp_path / "4348c8456f292bbd", 100, age_seconds=90_000)
    assert prune_results(tmp_path, older_than_seconds=7200) == (1, 100)
    assert notes.exists() and lock.exists() and not record.exists()


def test_a_missing_folder_prunes_nothing(tmp_path: Path) -> None:
    assert prune_results(tmp_path / "never-written", older_than_seconds=1) == (0, 0)


def test_the_pruner_keeps_pruning_while_the_worker_runs(tmp_path: Path) -> None:
    pruner = ResultPruner(tmp_path, ttl_seconds=60, interval=0.1)
    pruner.start()
    try:
        kept = _file(tmp_path / "recent", 10, age_seconds=1)
        aged = _file(tmp_path / "parameters" / "aged", 10, age_seconds=120)  # written after the start
        wait_for(lambda: not aged.exists(), timeout=10, interval=0.05, what="the aged file pruned")
        assert kept.exists()
    finally:
        pruner.stop()
        pruner.join(5)
    assert not pruner.is_alive()


def test_the_gpu_worker_prunes_prefects_local_storage_unless_a_block_holds_results(tmp_path: Path) -> None:
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK, temporary_settings

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "results"}):
        pruner = start_result_pruner(ttl_seconds=7200)
        assert pruner is not None
        pruner.stop()
        assert pruner.root == tmp_path / "results" and pruner.interval == 600
    with temporary_settings({PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: "s3-bucket/results"}):
        assert start_result_pruner(ttl_seconds=7200) is None


def test_results_must_outlive_the_render_timeout() -> None:
    with pytest.raises(ValidationError, match="result_ttl_seconds .* render_timeout_seconds") as caught:
        Settings(render_timeout_seconds=3600, result_ttl_seconds=1800)
    assert "I2VFLOW_RESULT_TTL_SECONDS" in str(caught.value)
    assert Settings().result_ttl_seconds > Settings().render_timeout_seconds
