#!/usr/bin/env bash
# Simulate a multi-host run on one machine: N processes on localhost, each with its own CPU
# devices, joined through jax.distributed (the same code path as a TPU pod or SLURM job).
#   launch/local_multiprocess.sh 2 configs/demo.py runs/demo_mp [--config.KEY=VALUE ...]
set -euo pipefail
n=${1:?usage: launch/local_multiprocess.sh NPROC CONFIG WORKDIR [overrides...]}
config=${2:?}; workdir=${3:?}; shift 3
port=${JAX_PORT:-12355}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS=localhost:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i \
    jaxlm train --config "$config" --workdir "$workdir" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
