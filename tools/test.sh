#!/usr/bin/env bash
# Fresh machine -> installed project -> the whole test suite (also what CI runs via .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
# idle OpenMP threads sleep instead of spinning: several times faster on a machine busy with other work
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# CPU build of PyTorch (a plain `pip install torch` may pull a multi-GB CUDA build); see README for GPU.
python -m pip install -q "torch==2.13.0"
# nnunetv2 (the nnunet extra) pulls timm -> torchvision; the constraint keeps the CPU torch installed above
python -m pip install -q -c tools/constraints.txt -e ".[test,nnunet]"
ruff check .
python -m pytest -n 2 -q "$@"
