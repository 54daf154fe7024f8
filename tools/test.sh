#!/usr/bin/env bash
# The test command (README, .ci/run): lint, then the suite twice, offline on the CPU:
#   1. .venv       current packages (diffusers, transformers 5, lycoris-lora 4, peft) - the headless engine
#   2. .venv-host  the AUTOMATIC1111 v1.10.1 pins (transformers 4.30.2, safetensors 0.4.2, numpy 1.26.2,
#                  Pillow 9.5.0, accelerate 0.21.0) with lycoris-lora 3.4.0, the one that imports on its torch
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LYCORIS_KERNEL_BACKEND=torch PIP_DISABLE_PIP_VERSION_CHECK=1

bash tools/setup.sh
.venv/bin/python -m pip install -q peft

if [ ! -x .venv-host/bin/python ]; then "$PY" -m venv .venv-host; fi
.venv-host/bin/python -c "import torch" 2>/dev/null || .venv-host/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv-host/bin/python -m pip install -q -r tools/host-pins.txt
.venv-host/bin/python -m pip install -q --no-deps -e .

.venv/bin/ruff check .
# the WebUI runs Python 3.10: make sure every file at least compiles there (when a 3.10 interpreter is around)
PY310=""
for cand in "${PYENV_ROOT:-$HOME/.pyenv}/versions/3.10.13/bin/python" python3.10; do
  if "$cand" -c "import sys; assert sys.version_info[:2] == (3, 10)" 2>/dev/null; then PY310=$cand; break; fi
done
if [ -n "$PY310" ]; then
  "$PY310" tools/compile_all.py
else
  echo "no Python 3.10 here: skipped the 3.10 compile check"
fi

echo "== tests with current packages (.venv)"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
echo "== tests with the WebUI's pinned packages (.venv-host)"
.venv-host/bin/python -m pytest -q -p no:cacheprovider "$@"
