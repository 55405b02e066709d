#!/usr/bin/env bash
# One GPU node: all its GPUs in one process; the mesh spans them.
#   launch/gpu.sh [--dry-run] CONFIG WORKDIR [--config.KEY=VALUE ...]
# Set up once with: python3 -m venv .venv && .venv/bin/pip install -e ".[gpu]"
# Several nodes: launch/slurm.sbatch. Check the fit first: jaxlm plan --config CONFIG --device h100
set -euo pipefail
# shellcheck source=launch/lib.sh
source "${BASH_SOURCE[0]%/*}/lib.sh"
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
(($# >= 2)) || die "usage: launch/gpu.sh [--dry-run] CONFIG WORKDIR [--config.KEY=VALUE ...]"
config=$1 workdir=$2
shift 2
# XLA preallocates this share of each GPU's memory (jaxlm plan counts 90% as usable)
run env XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}" \
  "${JAXLM:-jaxlm}" train --config "$config" --workdir "$workdir" "$@"
