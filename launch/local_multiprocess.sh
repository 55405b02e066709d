#!/usr/bin/env bash
# Simulate a multi-host run on one machine: N processes on localhost, each with its own CPU
# devices, joined through jax.distributed (the same code path as a TPU pod or SLURM job).
#   launch/local_multiprocess.sh [--dry-run] NPROC CONFIG WORKDIR [--config.KEY=VALUE ...]
# Process i logs to WORKDIR.logs/process-i.log as well as to this terminal (JAX_PORT: the
# coordinator's port, 12355 by default). Ctrl-C stops them all.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "${BASH_SOURCE[0]%/*}/lib.sh"
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
(($# >= 3)) || die "usage: launch/local_multiprocess.sh [--dry-run] NPROC CONFIG WORKDIR [overrides]"
n=$1 config=$2 workdir=$3
shift 3
port=${JAX_PORT:-12355}
pids=()
for ((i = 0; i < n; i++)); do
  cmd=(env JAX_COORDINATOR_ADDRESS="localhost:$port" JAX_NUM_PROCESSES="$n" JAX_PROCESS_ID="$i"
       "${JAXLM:-jaxlm}" train --config "$config" --workdir "$workdir" "$@")
  if [[ $DRY_RUN == 1 ]]; then
    run "${cmd[@]}"
    continue
  fi
  mkdir -p "$workdir.logs"
  "${cmd[@]}" > >(tee "$workdir.logs/process-$i.log") 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
