#!/usr/bin/env bash
# Set up .venv for headless use: torch (if missing), the engine, the standalone backend and the extra optimizers.
# On a CUDA machine, install the torch build for your GPU first (https://pytorch.org); this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[standalone,optimizers,test]"
echo "ready: .venv/bin/python -m lora_trainer --help"
