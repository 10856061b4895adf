"""Campaign figures on this machine: items/minute, orchestration overhead per item, live-drop wait.

Runs the real-stack test ``tests/e2e/test_campaign.py::test_live_drop_completes_while_a_40_item_campaign_runs``
(Prefect server, process worker, GPU task worker with the tiny model, 5 jobs x 8 seeds, 64x64,
8 frames, 10 steps, priority low) and prints the lines it measures:

    python benchmarks/bench_campaign.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST = "tests/e2e/test_campaign.py::test_live_drop_completes_while_a_40_item_campaign_runs"

if __name__ == "__main__":
    done = subprocess.run([sys.executable, "-m", "pytest", TEST, "-q", "-s", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(("campaign:", "live drop:"))]
    print("\n".join(lines) or done.stdout[-3000:])
    sys.exit(done.returncode)
