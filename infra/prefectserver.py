"""Prefect's server as `prefect server start` runs it, with SQLite write transactions that queue.

Why: on the embedded SQLite database Prefect begins its write transactions DEFERRED: a
transaction reads first and asks for the write lock at its first write. If another connection
committed in between, SQLite refuses at once ("database is locked", no busy wait), the API
answers 503 without a Retry-After, and Prefect's client tries again after 2 s. On `up` that was
one lone job in five to seven waiting 2 s, and three of five on an H200 once the watcher handed
renders over at detection (the render's start and the flow run's creation meet there). Begun
IMMEDIATE, as Prefect itself begins its automation-bucket transactions, a writer takes the lock
first and waits its turn on SQLite's busy timeout (milliseconds here) instead of failing.
PostgreSQL is untouched: the change is to Prefect's SQLite configuration only.

    python -m infra.prefectserver --host 127.0.0.1 --port 4200     # what `up` runs
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any


def queue_sqlite_writes() -> None:
    """Begin every SQLite write transaction of this process's Prefect server IMMEDIATE."""
    from prefect.server.database.configurations import AioSqliteConfiguration

    begin = AioSqliteConfiguration.begin_transaction

    @asynccontextmanager
    async def begin_immediate(self: Any, session: Any, with_for_update: bool = False) -> AsyncIterator[Any]:
        async with begin(self, session, with_for_update=True) as transaction:
            yield transaction

    AioSqliteConfiguration.begin_transaction = begin_immediate  # type: ignore[method-assign]


def main() -> None:
    from infra.settings import get_settings

    if get_settings().sqlite_queued_writes:
        queue_sqlite_writes()
    from prefect.cli import app

    sys.argv = ["prefect", "server", "start", *sys.argv[1:]]
    app()


if __name__ == "__main__":
    main()
