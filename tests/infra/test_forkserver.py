"""The fork server flow runs start from: a real server process, real callers, real signals."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from infra import forkserver
from infra.service import FLOW_MODULES, PROJECT_ROOT
from tests.helpers import wait_for

TARGET = "tests.infra.forkserver_target"


@dataclass
class Server:
    name: str
    process: subprocess.Popen[str]
    log: Path

    def caller_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "FORKSERVER_SERVER_ONLY"}
        return {**env, forkserver.SOCKET_ENV: self.name, "PREFECT_API_URL": "http://caller.invalid/api",
                "PREFECT_LOGGING_LEVEL": "DEBUG", **extra}


SERVER_ENV = {**os.environ, "FORKSERVER_SERVER_ONLY": "server", "PREFECT_API_URL": "http://server.invalid/api",
              "PREFECT_LOGGING_LEVEL": "ERROR"}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    name = f"@i2vflow-test-{secrets.token_hex(4)}"
    log = tmp_path / "forkserver.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "infra.forkserver", "serve", name, TARGET],
                                   cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, env=SERVER_ENV)
    wait_for(lambda: "listening" in log.read_text(), timeout=30, interval=0.05, what="the fork server")
    yield Server(name, process, log)
    process.terminate()
    process.wait(10)


def _call(env: dict[str, str], cwd: Path, *args: str, module: str = TARGET) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infra.forkserver", "run", module, *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def _start(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], dict[str, object]]:
    caller = subprocess.Popen([sys.executable, "-m", "infra.forkserver", "run", TARGET, *args], env=env,
                              cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert caller.stdout is not None
    return caller, json.loads(caller.stdout.readline())


def test_a_run_is_a_fork_of_the_server_with_the_callers_args_env_cwd_and_stdio(server: Server,
                                                                               tmp_path: Path) -> None:
    result = _call(server.caller_env(FORKSERVER_TEST_VALUE="from the caller"), tmp_path, "a b", "--exit", "3")
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout.splitlines()[0])
    assert report["ppid"] == server.process.pid  # forked from the server, not started by the caller
    assert report["argv"] == ["a b", "--exit", "3"]
    assert report["value"] == "from the caller" and report["server_only"] is None  # the caller's environment
    assert report["cwd"] == str(tmp_path)
    # Prefect read its settings from the server's environment at import; the run sees the caller's.
    assert (report["prefect_api_url"], report["prefect_log_level"]) == ("http://caller.invalid/api", "DEBUG")
    assert report["settings_rebuilt"]
    assert report["subprocess_rc"] == 0
    assert "to stderr" in result.stderr
    log = server.log.read_text()
    assert f"forked {report['pid']} to run {TARGET}" in log and f"{report['pid']} exited 3" in log


def _as_a_worker_passes_it(env: dict[str, str]) -> dict[str, str]:
    """``env`` as Prefect's process worker hands it to a flow run: its own settings exported as
    variables (normalised: "1.0", "False"), plus the run's ``PREFECT__`` ones."""
    export = "import json; from prefect.settings import get_current_settings as s; " \
             "print(json.dumps(s().to_environment_variables(exclude_unset=True)))"
    exported = subprocess.run([sys.executable, "-c", export], env=env, cwd=PROJECT_ROOT, capture_output=True,
                              text=True, check=True, timeout=60)
    return {**env, **json.loads(exported.stdout), "PREFECT__FLOW_RUN_ID": "0d6f3a52-0000-4000-8000-000000000000"}


def test_a_run_whose_prefect_environment_is_the_servers_keeps_the_servers_settings(server: Server,
                                                                                    tmp_path: Path) -> None:
    """Rebuilding Prefect's settings and logging cost ~0.09 s of every run's start; where the worker
    runs with the server's environment (``i2vflow up``) they would come out the same."""
    same = _as_a_worker_passes_it({**SERVER_ENV, forkserver.SOCKET_ENV: server.name})
    report = json.loads(_call(same, PROJECT_ROOT).stdout.splitlines()[0])
    assert report["ppid"] == server.process.pid and not report["settings_rebuilt"]
    assert (report["prefect_api_url"], report["prefect_log_level"]) == ("http://server.invalid/api", "ERROR")
    # Another working directory (its own prefect.toml or .env) or one Prefect variable more: rebuilt.
    elsewhere = json.loads(_call(same, tmp_path).stdout.splitlines()[0])
    assert elsewhere["settings_rebuilt"] and elsewhere["cwd"] == str(tmp_path)
    debug = json.loads(_call({**same, "PREFECT_LOGGING_LEVEL": "DEBUG"}, PROJECT_ROOT).stdout.splitlines()[0])
    assert debug["settings_rebuilt"] and debug["prefect_log_level"] == "DEBUG"


def test_without_a_server_the_caller_runs_the_module_itself(tmp_path: Path) -> None:
    for name in ("", "@i2vflow-test-nobody-listens"):
        env = {**os.environ, forkserver.SOCKET_ENV: name, "FORKSERVER_TEST_VALUE": "v",
               "PYTHONPATH": str(PROJECT_ROOT)}  # `tests` is not installed: found from the checkout
        result = _call(env, tmp_path, "--exit", "4")
        assert result.returncode == 4, result.stderr
        report = json.loads(result.stdout.splitlines()[0])
        assert report["ppid"] == os.getpid()  # exec'd in place: the caller's own process
        assert report["value"] == "v" and report["cwd"] == str(tmp_path)
    result = _call({**os.environ, forkserver.SOCKET_ENV: "/not/an/abstract/name", "PYTHONPATH": str(PROJECT_ROOT)},
                   tmp_path, "--exit", "5")
    assert result.returncode == 5 and "must be an abstract socket name" in result.stderr  # said, then run anyway


def test_a_module_the_server_did_not_preload_is_refused_and_run_by_the_caller(tmp_path: Path) -> None:
    name = f"@i2vflow-test-{secrets.token_hex(4)}"
    other = subprocess.Popen([sys.executable, "-m", "infra.forkserver", "serve", name, "json"], cwd=PROJECT_ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and "listening" in other.stdout.readline()
        env = {**os.environ, forkserver.SOCKET_ENV: name, "PYTHONPATH": str(PROJECT_ROOT)}
        result = _call(env, tmp_path, "--exit", "6")
    finally:
        other.terminate()
        other.wait(10)
    assert f"refused {TARGET}" in result.stderr and "not one this server preloaded (json)" in result.stderr
    assert result.returncode == 6 and json.loads(result.stdout)["ppid"] == os.getpid()  # run in the caller


def test_signals_to_the_caller_reach_the_run(server: Server) -> None:
    caller, report = _start(server.caller_env(), "--wait", "--on-term", "7")
    caller.send_signal(signal.SIGTERM)
    out, _ = caller.communicate(timeout=30)
    assert caller.returncode == 7 and "got SIGTERM" in out

    caller, report = _start(server.caller_env(), "--wait")  # no handler: SIGTERM kills it, and the caller alike
    caller.send_signal(signal.SIGTERM)
    caller.wait(30)
    assert caller.returncode == -signal.SIGTERM
    assert f"{report['pid']} exited -15" in server.log.read_text()


def test_a_killed_caller_takes_its_run_with_it(server: Server) -> None:
    caller, report = _start(server.caller_env(), "--wait")
    run = psutil.Process(int(report["pid"]))  # type: ignore[arg-type]
    caller.kill()  # what the worker does after its grace period
    caller.wait(10)
    wait_for(lambda: not psutil.pid_exists(run.pid), timeout=20, interval=0.1, what="the orphan killed and reaped")
    assert f"{run.pid}: its caller hung up, killed" in server.log.read_text()


def test_the_server_reaps_its_children_and_they_inherit_none_of_its_sockets(server: Server, tmp_path: Path) -> None:
    caller, report = _start(server.caller_env(), "--wait")
    sockets = psutil.Process(int(report["pid"])).net_connections(kind="unix")  # type: ignore[arg-type]
    caller.terminate()
    caller.wait(30)
    for _ in range(3):
        assert _call(server.caller_env(), tmp_path).returncode == 0
    wait_for(lambda: not psutil.Process(server.process.pid).children(), timeout=20, interval=0.1,
             what="no child (or zombie) left under the server")
    assert not sockets, sockets  # neither the listening socket nor another caller's connection


def test_a_child_that_cannot_be_set_up_fails_alone_and_the_server_serves_on(server: Server, tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect("\0" + server.name[1:])
        forkserver._send_request(conn, {"module": TARGET, "argv": [], "env": server.caller_env(),
                                        "cwd": str(tmp_path / "gone")})  # chdir fails in the child
        replies = conn.makefile("rb")
        started, ended = json.loads(replies.readline()), json.loads(replies.readline())
    assert "pid" in started and ended == {"status": 1}
    wait_for(lambda: not psutil.Process(server.process.pid).children(), timeout=20, interval=0.1,
             what="no stray fork left serving")
    assert _call(server.caller_env(), tmp_path).returncode == 0  # the server itself serves on


def test_a_module_that_fails_to_preload_is_said_and_the_server_serves_on(tmp_path: Path) -> None:
    name = f"@i2vflow-test-{secrets.token_hex(4)}"
    other = subprocess.Popen([sys.executable, "-m", "infra.forkserver", "serve", name, "no_such_module_here", TARGET],
                             cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None
        said = [other.stdout.readline(), other.stdout.readline()]
        assert "could not preload no_such_module_here: ModuleNotFoundError" in said[0] and "listening" in said[1]
        result = _call({**os.environ, forkserver.SOCKET_ENV: name}, tmp_path, "--exit", "2")
    finally:
        other.terminate()
        other.wait(10)
    assert result.returncode == 2 and json.loads(result.stdout)["ppid"] == other.pid


def test_the_server_preloads_what_prefect_yaml_runs() -> None:
    config = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())
    entrypoints = {d["entrypoint"].rsplit(".", 1)[0] for d in config["deployments"]}
    assert entrypoints <= set(FLOW_MODULES)
    command = config["definitions"]["work_pool"]["job_variables"]["command"].split()
    assert command[:4] == ["python3", "-m", "infra.forkserver", "run"] and command[4] in FLOW_MODULES
