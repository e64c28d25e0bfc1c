#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with the CPU build of PyTorch and ttq (editable).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
source .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned to the CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.4,<2.15" --index-url https://download.pytorch.org/whl/cpu
python -m pip install -q -e ".[test,plots,tasks]"
python -c "import ttq, torch; print('ttq', ttq.__version__, 'torch', torch.__version__)"
