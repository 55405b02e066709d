#!/usr/bin/env bash
# Train on this machine's CPU (or its one GPU, if jax[cuda] is installed).
#   launch/local_cpu.sh configs/demo.py runs/demo [--config.KEY=VALUE ...]
set -euo pipefail
config=${1:?usage: launch/local_cpu.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/local_cpu.sh CONFIG WORKDIR [overrides...]}
shift 2
exec jaxlm train --config "$config" --workdir "$workdir" "$@"
