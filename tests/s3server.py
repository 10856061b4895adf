"""A pytest plugin: a real S3 endpoint over HTTP (moto's server), once per test session.

Why moto's server rather than ``mock_aws``: the minio client talks plain HTTP through urllib3,
which ``mock_aws`` does not intercept, and the point is to exercise the real wire protocol
(signing, multipart, presigned URLs, timeouts). MinIO's own server does not install from PyPI.

Load it from the root conftest with ``pytest_plugins = ["tests.s3server"]`` (or, below the root,
``from tests.s3server import s3_moto, s3_server, s3_bucket``). Moto keeps all buckets in this process:
a test that calls ``moto.mock_aws`` resets them, so give each test its own bucket (``s3_bucket``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from minio import Minio
from moto.server import ThreadedMotoServer

from infra.store.bucket import make_client

REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 server listens and the (fake, but signed-with) credentials."""

    endpoint: str  # "127.0.0.1:PORT", the form minio.Minio expects
    access_key: str = "test-access-key"
    secret_key: str = "test-secret-key-0123456789"
    region: str = REGION

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def client(self) -> Minio:
        """A minio client for this server, with the pipeline's short timeouts."""
        return make_client(self.endpoint, self.access_key, self.secret_key, region=self.region)

    def settings_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``infra.settings.Settings`` that point at this server."""
        return {
            "s3_endpoint": self.endpoint,
            "s3_access_key": self.access_key,
            "s3_secret_key": self.secret_key,
            "s3_region": self.region,
            "s3_secure": False,
        }


def start_moto() -> tuple[ThreadedMotoServer, S3Server]:
    """Start a moto server on a free port of 127.0.0.1 (port 0: the OS picks, no race).

    Its werkzeug access log is turned down to warnings: one line per request drowns test
    output, and presigned-URL lines carry the access key id.
    """
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, S3Server(endpoint=f"{host}:{port}")


class RestartableMoto:
    """A moto server that a test may really stop and start again on the same port.

    ``stop`` closes the listening socket, so new connections are refused at once (as from a dead
    host) instead of queueing; moto keeps its buckets in this process, so they survive a restart.
    """

    def __init__(self) -> None:
        self.server: ThreadedMotoServer | None
        self.server, self.info = start_moto()

    def stop(self) -> None:
        if self.server is None:
            return
        self.server.stop()
        self.server._server.server_close()  # type: ignore[union-attr]
        self.server = None

    def start(self) -> None:
        if self.server is not None:
            return
        host, port = self.info.endpoint.rsplit(":", 1)
        self.server = ThreadedMotoServer(ip_address=host, port=int(port), verbose=False)
        self.server.start()


@pytest.fixture(scope="session")
def s3_moto() -> Iterator[RestartableMoto]:
    """The session's moto server itself, for tests that stop it (they must start it again)."""
    moto = RestartableMoto()
    try:
        yield moto
    finally:
        moto.stop()


@pytest.fixture(scope="session")
def s3_server(s3_moto: RestartableMoto) -> S3Server:
    """Where the session's moto S3 server listens."""
    return s3_moto.info


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[tuple[Minio, str]]:
    """A fresh, uniquely named, empty bucket; emptied and removed afterwards."""
    client = s3_server.client()
    name = f"test-{uuid.uuid4().hex[:16]}"
    client.make_bucket(name)
    try:
        yield client, name
    finally:
        _remove_bucket(client, name)


def _remove_bucket(client: Minio, name: str) -> None:
    """Best-effort cleanup: a test may have stopped or wiped the server already."""
    try:
        for obj in client.list_objects(name, recursive=True):
            client.remove_object(name, obj.object_name or "")
        client.remove_bucket(name)
    except Exception:  # noqa: BLE001 - cleanup must not mask the test's own result
        pass
