#!/usr/bin/env bash
# The two commands of the README:
#   infra/dev.sh up     install what is missing, then run the whole service on embedded defaults
#   infra/dev.sh test   install what is missing (with test extras), then run lint and the test suite
# Installs into .venv (or $I2VFLOW_VENV). torch comes first and on purpose: a CUDA build where
# an NVIDIA GPU is present, the CPU build everywhere else (never a multi-GB CUDA download on a
# CPU-only box).
set -euo pipefail
cd "$(dirname "$0")/.."
command="${1:-}"
case "$command" in up|test) ;; *) echo "usage: infra/dev.sh up|test" >&2; exit 2 ;; esac

venv="${I2VFLOW_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"

stamp="$venv/.i2vflow-installed-$command"
want="$(cat pyproject.toml infra/dev.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[i2vflow] installing into $venv (first run takes a few minutes) ..." >&2
  "$py" -m pip install -q --upgrade pip
  if ! "$py" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
      "$py" -m pip install -q "torch>=2.5"                       # PyPI's Linux wheel is a CUDA build
    elif ! "$py" -m pip install -q "torch==2.13.0+cpu" 2>/dev/null; then   # a local CPU wheel
      "$py" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
  extras=""; [ "$command" = test ] && extras="[test]"
  "$py" -m pip install -q -e ".$extras"
  echo "$want" > "$stamp"
fi

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" PREFECT_SERVER_ANALYTICS_ENABLED=false
if [ "$command" = up ]; then
  exec "$venv/bin/i2vflow" up
fi
"$venv/bin/ruff" check .
exec "$py" -m pytest -q -p no:cacheprovider "${@:2}"
