#!/usr/bin/env bash
# Creates .venv with everything the project needs: the package (editable) with its operator,
# trainer and test extras. Safe to rerun: it only installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
if [[ ! -x .venv/bin/uv ]]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check uv
fi
uv_install() { .venv/bin/uv pip install --quiet --python .venv/bin/python "$@"; }

# DeepSpeed's setup imports torch, so torch goes in first and DeepSpeed builds without isolation.
uv_install "torch>=2.3" "setuptools>=69" wheel
uv_install --no-build-isolation "deepspeed>=0.15"
uv_install -e ".[operator,trainer,test]"
echo "environment ready: .venv ($(.venv/bin/python --version))"
