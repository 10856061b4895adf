"""The ledger: one claim per job across watchers, leases that expire, restarts that remember."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from infra.jobs import JobTicket
from infra.ledger import Ledger


def _ticket(job_id: str = "job1") -> JobTicket:
    return JobTicket(job_id=job_id, stem="shoe", inbox="/in", outbox="/out", image_key="shoe.png",
                     spec_key="shoe.json", image_sha256="a", spec_sha256="b")


def test_a_job_is_recorded_once_and_survives_reopening(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3")
    assert ledger.record_detected(_ticket()) is True
    assert ledger.record_detected(_ticket()) is False
    ledger.close()
    reopened = Ledger(tmp_path / "l.sqlite3")
    assert reopened.get("job1").state == "detected"
    assert reopened.record_detected(_ticket()) is False


def test_only_one_of_many_concurrent_claimers_wins(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    Ledger(path).record_detected(_ticket())
    wins: list[bool] = []

    def claim(owner: str) -> None:
        wins.append(Ledger(path).claim("job1", owner, lease_seconds=60))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == [False] * 7 + [True]


def test_an_expired_lease_can_be_claimed_again(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.record_detected(_ticket())
    assert ledger.claim("job1", "dead-watcher", lease_seconds=0.05)
    assert ledger.claim("job1", "other", lease_seconds=60) is False
    time.sleep(0.1)
    assert ledger.claimable() == ["job1"]
    assert ledger.claim("job1", "other", lease_seconds=60)
    assert ledger.get("job1").attempts == 2


def test_release_and_submit_and_finish(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.record_detected(_ticket())
    ledger.claim("job1", "me", 60)
    ledger.release("job1", "me", "server down")
    record = ledger.get("job1")
    assert (record.state, record.last_error) == ("detected", "server down")
    ledger.claim("job1", "me", 60)
    ledger.mark_submitted("job1", "run-1")
    assert ledger.claimable() == []
    ledger.mark_finished("job1", ok=True)
    assert ledger.get("job1").flow_run_id == "run-1" and ledger.counts() == {"done": 1}


def test_hash_cache_is_keyed_by_version(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite3")
    ledger.remember_hash("/in", "a.png", 10, "v1", "sha")
    assert ledger.cached_hash("/in", "a.png", 10, "v1") == "sha"
    assert ledger.cached_hash("/in", "a.png", 10, "v2") is None
