"""What the fork server tests run in place of Prefect's engine: reports how it was started.

    python -m tests.infra.forkserver_target [--exit N] [--wait] [--on-term N]
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import prefect.context
from prefect.settings import get_current_settings  # preloaded by the server, as the engine's imports are


def main(args: list[str]) -> int:
    if "--on-term" in args:
        code = int(args[args.index("--on-term") + 1])
        signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), os._exit(code)))
    print(json.dumps({
        "argv": args, "pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(),
        "value": os.environ.get("FORKSERVER_TEST_VALUE"),
        "server_only": os.environ.get("FORKSERVER_SERVER_ONLY"),
        "subprocess_rc": subprocess.run(["true"]).returncode,  # SIGCHLD as in a fresh interpreter
        "prefect_api_url": get_current_settings().api.url,
        "prefect_log_level": logging.getLevelName(logging.getLogger("prefect").getEffectiveLevel()),
        # Prefect's root settings were built in the server, at import; a run may have its own.
        "settings_rebuilt": get_current_settings() is not prefect.context.GLOBAL_SETTINGS_CONTEXT.settings,
    }), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if "--wait" in args:
        time.sleep(120)
    return int(args[args.index("--exit") + 1]) if "--exit" in args else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
