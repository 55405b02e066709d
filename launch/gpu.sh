#!/usr/bin/env bash
# One GPU node (all its GPUs in one process; the mesh spans them).
#   launch/gpu.sh configs/gpt2_124m.py runs/gpt2 [--config.KEY=VALUE ...]
# Set up once with: python3 -m venv .venv && .venv/bin/pip install -e ".[gpu]"
set -euo pipefail
config=${1:?usage: launch/gpu.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/gpu.sh CONFIG WORKDIR [overrides...]}
shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec "${JAXLM:-jaxlm}" train --config "$config" --workdir "$workdir" "$@"
