#!/usr/bin/env bash
# Fresh machine -> installed project -> the demo (synthetic CT-like volumes, shipped model, no download).
set -euo pipefail
cd "$(dirname "$0")/.."
# idle OpenMP threads sleep instead of spinning: several times faster on a machine busy with other work
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e .
rankseg-monai demo "$@"
