"""Start each flow run as a fork of a process that has already imported Prefect and the flows.

Why: Prefect's process worker starts a fresh interpreter per flow run, and on a lone job that
start (Python, ``import prefect``, the flow module: 1.5-2.8 s) is most of the time between the
run being created and the flow starting. A fork of a process that has done those imports starts
in milliseconds, and each flow run still gets a process of its own (crash isolation, Prefect's
cancellation and crash detection), as Airflow's task runner and gunicorn's preload do.

Two halves:

    python -m infra.forkserver serve @NAME MODULE...   # the server: imports MODULEs, then waits
    python3 -m infra.forkserver run prefect.engine      # the command prefect.yaml gives the worker

``run`` asks the server named by ``I2VFLOW_FORKSERVER`` (``@NAME``: a Linux abstract socket, so
nothing to clean up and no path-length limit) to fork a child that runs the module as
``python -m`` would, with the caller's environment, working directory and stdin/stdout/stderr.
It forwards the worker's signals to the child and exits with the child's status, so to the
process worker it looks like the engine itself. Without a server (unset, not answering, not
Linux) or when it refuses, ``run`` exec's ``python -m MODULE`` in place: the old path, one
interpreter start slower.

The server stays single-threaded (a fork copies only the forking thread), serves only callers
running as its own user (checked on the socket: abstract sockets have no file permissions),
runs only the modules it preloaded, and kills a child whose caller died (the worker's SIGKILL
reaches only the caller).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import NoReturn

SOCKET_ENV = "I2VFLOW_FORKSERVER"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
_HEADER = struct.Struct("!I")


def supported() -> bool:
    """Fork servers need Linux (abstract sockets, ``os.pidfd_open``: 5.3+, not blocked by a
    container's seccomp profile); elsewhere ``run`` exec's."""
    if not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


def _address(name: str) -> str:
    if not name.startswith("@") or len(name) < 2:
        raise ValueError(f"{SOCKET_ENV} must be an abstract socket name like @i2vflow-forkserver (got {name!r})")
    return "\0" + name[1:]


# ---------------------------------------------------------------- the caller (the worker's command)


def run(module: str, argv: list[str]) -> int:
    """Run ``module`` in a fork of the server, or in place (exec) when there is none."""
    name = os.environ.get(SOCKET_ENV, "")
    try:
        conn = _connect(name)
    except ValueError as error:
        sys.stderr.write(f"i2vflow forkserver not used: {error}\n")
        _run_here(module, argv)
    except OSError:  # none running (or restarting, or not Linux): the old path
        _run_here(module, argv)
    with conn:
        request = {"module": module, "argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}
        _send_request(conn, request)
        replies = conn.makefile("rb")
        started = json.loads(replies.readline() or b"{}")
        if "error" in started or "pid" not in started:
            # The server only saves time: whatever it cannot do, this process does the old way.
            sys.stderr.write(f"i2vflow forkserver {name} refused {module}: {started.get('error', 'no reply')}; "
                             "running it here\n")
            _run_here(module, argv)
        _forward_signals(started["pid"])
        ended = json.loads(replies.readline() or b"{}")
    if "status" not in ended:
        sys.stderr.write(f"i2vflow forkserver {name} went away while {module} ran\n")
        return 1
    return _exit_like(ended["status"])


def _run_here(module: str, argv: list[str]) -> NoReturn:
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])


def _connect(name: str) -> socket.socket:
    if not name:
        raise FileNotFoundError("no fork server named")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(_address(name))
    except OSError:
        conn.close()
        raise
    return conn


def _send_request(conn: socket.socket, request: dict[str, object]) -> None:
    body = json.dumps(request).encode()
    socket.send_fds(conn, [_HEADER.pack(len(body))], [0, 1, 2])
    conn.sendall(body)


def _forward_signals(pid: int) -> None:
    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)


def _exit_like(status: int) -> int:
    """The child's exit code; a child killed by a signal kills this process with the same one,
    so the worker reports what it would have reported for the engine itself."""
    if status < 0:
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    return status


# ---------------------------------------------------------------- the server


@dataclass
class _Child:
    pid: int
    pidfd: int
    conn: socket.socket
    caller_gone: bool = False

    def close(self) -> None:
        os.close(self.pidfd)
        self.conn.close()


def serve(name: str, modules: list[str]) -> dict[str, object]:
    """Import ``modules``, then fork one child per request on the abstract socket ``name``
    (``@...``) until SIGTERM or SIGINT. Returns only in a child: the request it is to run."""
    if not supported():
        raise SystemExit("the i2vflow forkserver needs Linux (os.fork and os.pidfd_open)")
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - a run that needs it fails in its own process, as it would anyway
            _say(f"could not preload {module}: {type(error).__name__}: {error}")
    _settle_prefect_settings()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(_address(name))
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: dict[int, _Child] = {}
    server_pid = os.getpid()
    _say(f"i2vflow forkserver: {len(modules)} module(s) imported, listening on {name}")
    try:
        while True:
            for key, _ in selector.select():
                if key.fileobj is not listener:
                    _reap_or_kill(key.data, selector, children)
                elif request := _accept(listener, selector, children, modules):
                    return request
    finally:
        if os.getpid() == server_pid:
            for child in children.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)


def _accept(listener: socket.socket, selector: selectors.BaseSelector, children: dict[int, _Child],
            modules: list[str]) -> dict[str, object] | None:
    """Serve one caller: fork, track the child. In the child, return its request."""
    conn, _ = listener.accept()
    fds: list[int] = []
    try:
        conn.settimeout(10)
        request, fds = _read_request(conn)
        problem = _refusal(conn, request, modules)
        if problem:
            _reply(conn, {"error": problem})
            conn.close()
            return None
        conn.settimeout(None)
        pid = os.fork()
        if pid == 0:
            _become_child_or_exit(request, fds, listener, selector, conn, *children.values())
            fds = []
            return request
        pidfd = _track(pid)
    except (OSError, ValueError) as error:
        with contextlib.suppress(OSError):
            _reply(conn, {"error": f"{type(error).__name__}: {error}"})
        conn.close()
        return None
    finally:
        for fd in fds:
            os.close(fd)
    child = _Child(pid, pidfd, conn)
    children[pid] = child
    selector.register(pidfd, selectors.EVENT_READ, child)
    selector.register(conn, selectors.EVENT_READ, child)
    _say(f"forked {pid} to run {request['module']}")
    with contextlib.suppress(OSError):  # a caller gone already: its hang-up kills the child next
        _reply(conn, {"pid": pid})
    return None


def _read_request(conn: socket.socket) -> tuple[dict[str, object], list[int]]:
    header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
    if len(header) != _HEADER.size or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError("malformed request: expected a length and three file descriptors")
    (length,) = _HEADER.unpack(header)
    body = bytearray()
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    try:
        return json.loads(body), fds
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise


def _refusal(conn: socket.socket, request: dict[str, object], modules: list[str]) -> str:
    """Why this request is refused, or '' to serve it."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    if uid != os.getuid():
        return f"caller uid {uid} is not this server's user"
    if request.get("module") not in modules:
        return f"module {request.get('module')!r} is not one this server preloaded ({', '.join(modules)})"
    return ""


def _say(line: str) -> None:
    print(f"{datetime.now().strftime('%H:%M:%S.%f')[:-3]} {line}", flush=True)


def _reply(conn: socket.socket, message: dict[str, object]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _reap_or_kill(child: _Child, selector: selectors.BaseSelector, children: dict[int, _Child]) -> None:
    """The child ended: tell its caller how. Or its caller hung up first: kill the child."""
    if child.pid not in children:
        return  # both of its events came in one pass; the first one finished it
    pid, status = os.waitpid(child.pid, os.WNOHANG)
    if pid == 0:
        # The caller is gone (the worker SIGKILLs it after a grace period): so is the run. The
        # pidfd turns readable once the child has died, and the next pass reaps it.
        os.kill(child.pid, signal.SIGKILL)
        selector.unregister(child.conn)
        child.caller_gone = True
        _say(f"{child.pid}: its caller hung up, killed")
        return
    code = os.waitstatus_to_exitcode(status)
    _say(f"{child.pid} exited {code}")
    if not child.caller_gone:
        with contextlib.suppress(OSError):
            _reply(child.conn, {"status": code})
        selector.unregister(child.conn)
    selector.unregister(child.pidfd)
    child.close()
    del children[child.pid]


# ---------------------------------------------------------------- the forked child


def _track(pid: int) -> int:
    """A pidfd for the new child; without one it is killed, so its caller can run the module itself."""
    try:
        return os.pidfd_open(pid)
    except OSError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise


def _become_child_or_exit(request: dict[str, object], fds: list[int], *inherited: object) -> None:
    """A child that cannot be set up exits: it must never go back to serving."""
    try:
        _become_child(request, fds, *inherited)
    except BaseException:  # noqa: BLE001 - anything at all, or this fork would serve callers too
        import traceback

        traceback.print_exc()
        os._exit(1)


def _become_child(request: dict[str, object], fds: list[int], *inherited: object) -> None:
    """Give this fork what a fresh ``python -m`` started by the caller would have: its stdio,
    working directory, environment and default signal handling; none of the server's sockets."""
    for thing in inherited:
        thing.close()  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(str(request["cwd"]))
    os.environ.clear()
    os.environ.update(request["env"])  # type: ignore[arg-type]


def run_forked(request: dict[str, object]) -> None:
    """Run the request's module as ``__main__`` (its SystemExit ends this child as it would end
    ``python -m``: non-daemon threads joined, atexit handlers run, stdio flushed)."""
    module = str(request["module"])
    sys.argv = [module, *request["argv"]]  # type: ignore[misc]
    # Its imports stay loaded; its own body runs afresh as __main__, as under `python -m`.
    sys.modules.pop(module, None)
    with _settings_from_environment():
        runpy.run_module(module, run_name="__main__", alter_sys=True)


def _prefect_environment() -> tuple[str, tuple[tuple[str, str], ...]]:
    """What Prefect's settings are read from: the working directory (its prefect.toml, .env) and
    the ``PREFECT_`` variables (``PREFECT__`` ones, like the flow run id, are not settings)."""
    names = (name for name in os.environ if name.startswith("PREFECT_") and not name.startswith("PREFECT__"))
    return os.getcwd(), tuple(sorted((name, os.environ[name]) for name in names))


_IMPORTED_WITH: tuple[str, tuple[tuple[str, str], ...]] | None = None


def _settle_prefect_settings() -> None:
    """In the server: configure Prefect's logging as a run would, and note the environment its
    settings came from, written as Prefect's process worker passes it to a run (its settings
    exported, normalised: "1.0", "False"), so that a run started with the same settings matches."""
    global _IMPORTED_WITH
    if "prefect" in sys.modules:
        from prefect.logging.configuration import ensure_logging_setup
        from prefect.settings import get_current_settings

        os.environ.update(get_current_settings().to_environment_variables(exclude_unset=True))
        ensure_logging_setup()
    _IMPORTED_WITH = _prefect_environment()


@contextlib.contextmanager
def _settings_from_environment() -> Iterator[None]:
    """Prefect read its settings from the server's environment at import; the run must see the
    caller's (the work pool's job variables). The same step Prefect's own
    ``run_flow_in_subprocess`` takes, skipped when the caller's Prefect environment is the one
    the server imported with: the settings would come out the same, and building them and
    Prefect's logging again cost ~0.09 s of every run's start."""
    if "prefect" not in sys.modules or _prefect_environment() == _IMPORTED_WITH:
        yield
        return
    from prefect.context import SettingsContext, get_settings_context
    from prefect.logging.configuration import setup_logging
    from prefect.settings import Settings

    with SettingsContext(profile=get_settings_context().profile, settings=Settings()):
        setup_logging()  # log levels too: `import prefect` set them from the server's environment
        yield


def main(args: list[str]) -> int:
    usage = "usage: python -m infra.forkserver serve @NAME MODULE... | run MODULE [ARG...]"
    if len(args) >= 3 and args[0] == "serve":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            request = serve(args[1], args[2:])
        except KeyboardInterrupt:
            return 0
        run_forked(request)  # a child: the server itself never gets here
        return 0
    if len(args) >= 2 and args[0] == "run":
        return run(args[1], args[2:])
    sys.stderr.write(usage + "\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
