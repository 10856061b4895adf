"""Every flow run is a fresh Python process (Prefect's process worker), so what
flows/generate.py imports is paid on every job before its first step."""

from __future__ import annotations

import json
import subprocess
import sys

from infra.service import PROJECT_ROOT


def test_the_flow_module_leaves_the_model_stack_and_the_s3_client_unloaded() -> None:
    heavy = ["torch", "diffusers", "transformers", "minio"]
    probe = f"import sys, json, flows.generate; print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
