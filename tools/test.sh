#!/usr/bin/env bash
# Fresh machine -> installed project -> the whole test suite (also what CI runs via .ci/run).
# Each set-up step is announced (tools/_setup.sh: which PyTorch build it installs and from where).
set -euo pipefail
cd "$(dirname "$0")/.."
# idle OpenMP threads sleep instead of spinning: several times faster on a machine busy with other work
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
EXTRAS="[test,nnunet]" . tools/_setup.sh
echo "==> 4/4 ruff check, then pytest -n 2 $*" >&2
ruff check .
python -m pytest -n 2 -q "$@"
