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
# the WebUI runs Python 3.10: make sure every file at least compiles there
if command -v python3.10 >/dev/null || [ -x "${PYENV_ROOT:-$HOME/.pyenv}/versions/3.10.13/bin/python" ]; then
  PY310=$(command -v python3.10 || echo "${PYENV_ROOT:-$HOME/.pyenv}/versions/3.10.13/bin/python")
  "$PY310" - <<'PYEOF'
import pathlib, sys
bad = []
for p in pathlib.Path(".").glob("**/*.py"):
    if ".venv" in p.parts:
        continue
    try:
        compile(p.read_text(encoding="utf-8"), str(p), "exec")
    except SyntaxError as e:
        bad.append(f"{p}: {e}")
print("\n".join(bad) or "python3.10: all files compile")
sys.exit(1 if bad else 0)
PYEOF
fi

echo "== tests with current packages (.venv)"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
echo "== tests with the WebUI's pinned packages (.venv-host)"
.venv-host/bin/python -m pytest -q -p no:cacheprovider "$@"
