"""`i2vflow up`, the README's first command, as a newcomer runs it: its own Prefect server on
SQLite, the deployments, a flow worker and one GPU worker (the tiny model on this CPU host);
an example dropped into the inbox becomes a video; Ctrl-C stops every process it started."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from infra.engine.video import probe_mp4
from infra.service import PROJECT_ROOT
from tests.helpers import wait_for
from tests.ports import free_port


def test_up_renders_a_dropped_example_and_ctrl_c_stops_everything(tiny_model_cache: Path, tmp_path: Path) -> None:
    inbox, outbox, state = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "I2VFLOW_"))}
    env.update({"I2VFLOW_INBOX": str(inbox), "I2VFLOW_OUTBOX": str(outbox), "I2VFLOW_STATE_DIR": str(state),
                "I2VFLOW_MODEL_CACHE": str(tiny_model_cache), "I2VFLOW_METRICS_PORT": "0",
                "I2VFLOW_GPU_WORKER_METRICS_PORT": "0", "PYTHONUNBUFFERED": "1"})
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115 - closed below
    up = subprocess.Popen([sys.executable, "-m", "infra.cli", "up", "--port", str(free_port())], cwd=PROJECT_ROOT,
                          env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        inbox.mkdir(parents=True, exist_ok=True)
        wait_for(lambda: b"Ctrl-C stops everything" in (tmp_path / "up.log").read_bytes(), timeout=300,
                 what="`up` to report it is ready")
        for suffix in (".json", ".png"):
            shutil.copy(PROJECT_ROOT / "examples" / "inbox" / f"shoe{suffix}", inbox / f"shoe{suffix}")
        wait_for(lambda: (outbox / "shoe.json").exists(), timeout=300, what="the example's video and sidecar")
        assert probe_mp4(outbox / "shoe.mp4").frames == 16  # examples/inbox/shoe.json asks for 16
        children = psutil.Process(up.pid).children(recursive=True)
        names = (tmp_path / "up.log").read_text()
        assert "1 GPU worker(s) (CPU)" in names
        assert "without a flow run id" not in names  # the watcher's logs stay local, no Prefect warning
        up.send_signal(signal.SIGINT)
        assert up.wait(90) == 0
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [p.pid for p in alive]
    finally:  # on a failure, leave no server or worker behind for the rest of the suite
        if up.poll() is None:
            leftovers = psutil.Process(up.pid).children(recursive=True)
            up.send_signal(signal.SIGINT)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
            for proc in psutil.wait_procs(leftovers, timeout=10)[1]:
                proc.kill()
        log.close()
