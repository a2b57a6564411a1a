#!/usr/bin/env bash
# Fresh machine -> installed project -> the demo (synthetic CT-like volumes, shipped model, no download).
# Each set-up step is announced (tools/_setup.sh: which PyTorch build it installs and from where).
set -euo pipefail
cd "$(dirname "$0")/.."
# idle OpenMP threads sleep instead of spinning: several times faster on a machine busy with other work
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
EXTRAS="" . tools/_setup.sh
echo "==> 4/4 rankseg-monai demo $*" >&2
rankseg-monai demo "$@"
