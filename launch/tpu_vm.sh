#!/usr/bin/env bash
# Cloud TPU VMs, single host or pod slice: create, set up, run on every worker, delete.
#   export TPU_NAME=jaxlm-v4 ZONE=us-central2-b ACCELERATOR=v4-32 PROJECT=my-project
#   launch/tpu_vm.sh create
#   launch/tpu_vm.sh setup                      # copies this repo and installs jaxlm[tpu]
#   launch/tpu_vm.sh run configs/gpt2_124m.py gs://BUCKET/runs/gpt2 [--config.KEY=VALUE ...]
#   launch/tpu_vm.sh delete
# Every worker runs the same command; JAX finds its peers itself (jax.distributed), each host
# reads its own shard of the data, and checkpoints go to the shared workdir (use a GCS bucket).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-8}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} \
    --worker=all --command "$1"
}
case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} \
      --accelerator-type "$ACCELERATOR" --version "$RUNTIME" ;;
  setup)
    tar czf /tmp/jaxlm.tgz --exclude .git --exclude runs --exclude .venv .
    gcloud compute tpus tpu-vm scp /tmp/jaxlm.tgz "$TPU_NAME":~/ --zone "$ZONE" \
      ${PROJECT:+--project "$PROJECT"} --worker=all
    ssh_all "mkdir -p jaxlm && tar xzf jaxlm.tgz -C jaxlm && cd jaxlm && python3 -m venv .venv \
      && .venv/bin/pip install -q -e '.[tpu]'" ;;
  run)
    shift
    config=${1:?run needs CONFIG WORKDIR}; workdir=${2:?run needs CONFIG WORKDIR}; shift 2
    ssh_all "cd jaxlm && .venv/bin/jaxlm train --config $config --workdir $workdir $*" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} \
      --quiet ;;
  *) echo "usage: $0 create|setup|run CONFIG WORKDIR [overrides]|delete" >&2; exit 2 ;;
esac
