#!/usr/bin/env bash
# Train on this machine's CPU (or its one GPU, if jax[cuda] is installed).
#   launch/local_cpu.sh [--dry-run] configs/demo.py runs/demo [--config.KEY=VALUE ...]
set -euo pipefail
# shellcheck source=launch/lib.sh
source "${BASH_SOURCE[0]%/*}/lib.sh"
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
(($# >= 2)) || die "usage: launch/local_cpu.sh [--dry-run] CONFIG WORKDIR [--config.KEY=VALUE ...]"
config=$1 workdir=$2
shift 2
run "${JAXLM:-jaxlm}" train --config "$config" --workdir "$workdir" "$@"
