#!/usr/bin/env bash
# Cloud TPU VMs, one host or a pod slice: create (on-demand, spot or queued), set up every worker,
# run detached on every worker, status, logs, stop, delete.
#   export TPU_NAME=jaxlm ZONE=us-east5-a ACCELERATOR=v5p-64 PROJECT=my-project
#   launch/tpu_vm.sh create [--spot | --queued [--spot]]
#   launch/tpu_vm.sh setup                   # copies this checkout, installs jaxlm[tpu] on each
#   launch/tpu_vm.sh run CONFIG gs://BUCKET/runs/NAME [--config.KEY=VALUE ...]
#   launch/tpu_vm.sh status | logs [--worker N] [--fetch DIR] | stop | delete [--queued]
#   launch/tpu_vm.sh --dry-run COMMAND ...   # print the gcloud commands instead
# `run` starts `jaxlm train` on every worker under setsid/nohup and returns: closing the laptop
# does not stop it. Each worker keeps its log in ~/jaxlm-logs/$RUN.log (RUN=jaxlm by default);
# `logs` shows or fetches them. JAX finds its peers itself (jax.distributed on Cloud TPU); the
# work directory must be shared by all workers: use a gs:// bucket. `stop` sends SIGTERM: every
# process saves the current step and exits; `run` with the same arguments resumes.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "${BASH_SOURCE[0]%/*}/lib.sh"

if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v5p-8}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}  # the TPU VM software version for the accelerator
RUN=${RUN:-jaxlm}  # names the log and pid files on the workers
LOGS="\$HOME/jaxlm-logs"  # on the workers; expanded there
project=()
if [[ -n ${PROJECT:-} ]]; then project=(--project "$PROJECT"); fi

# workers: the hosts of $ACCELERATOR (4 chips each; v4 and v5p names count 2 cores a chip)
workers() {
  local gen=${ACCELERATOR%-*} size=${ACCELERATOR##*-} per_chip=1
  [[ $gen == v4 || $gen == v5p ]] && per_chip=2
  local chips=$((size / per_chip))
  echo "${WORKERS:-$(((chips + 3) / 4))}"
}

ssh_workers() {  # ssh_workers WORKER COMMAND: on one worker (a number) or all
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${project[@]}" \
    --worker="$1" --command "$2"
}

create() {
  local spot=() queued=0
  for arg in "$@"; do
    case $arg in
      --spot) spot=(--spot) ;;
      --queued) queued=1 ;;
      *) die "create takes --spot and --queued, not $arg" ;;
    esac
  done
  if ((queued)); then  # waits in the queue until capacity frees up, then creates the VM
    run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id "$TPU_NAME" \
      --zone "$ZONE" "${project[@]}" --accelerator-type "$ACCELERATOR" \
      --runtime-version "$RUNTIME" "${spot[@]}"
    echo "queued; watch with: gcloud compute tpus queued-resources describe $TPU_NAME --zone $ZONE"
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" "${project[@]}" \
      --accelerator-type "$ACCELERATOR" --version "$RUNTIME" "${spot[@]}"
  fi
}

setup() {
  local tarball=${TMPDIR:-/tmp}/jaxlm-$TPU_NAME.tgz
  run tar czf "$tarball" --exclude .git --exclude runs --exclude .venv .
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:jaxlm.tgz" --zone "$ZONE" \
    "${project[@]}" --worker=all
  ssh_workers all "mkdir -p jaxlm && tar xzf jaxlm.tgz -C jaxlm && cd jaxlm \
&& python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
}

start() {
  (($# >= 2)) || die "run needs CONFIG WORKDIR [--config.KEY=VALUE ...]"
  local config=$1 workdir=$2
  shift 2
  local train
  train=$(quote .venv/bin/jaxlm train --config "$config" --workdir "$workdir" "$@")
  ssh_workers all "mkdir -p $LOGS && cd jaxlm && setsid nohup $train \
> $LOGS/$RUN.log 2>&1 < /dev/null & echo \$! > $LOGS/$RUN.pid"
  echo "started on $(workers) workers; follow with: $0 logs   (or status, stop)"
}

status() {
  run gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" "${project[@]}" \
    --format 'value(state,health)'
  ssh_workers all "if kill -0 \$(cat $LOGS/$RUN.pid 2>/dev/null) 2>/dev/null; \
then echo \"\$(hostname): running\"; else echo \"\$(hostname): not running\"; fi; \
tail -n 1 $LOGS/$RUN.log 2>/dev/null || true"
}

logs() {
  local worker=0 fetch=""
  while (($#)); do
    case $1 in
      --worker) worker=${2:?--worker needs N}; shift 2 ;;
      --fetch) fetch=${2:?--fetch needs DIR}; shift 2 ;;
      *) die "logs takes --worker N and --fetch DIR, not $1" ;;
    esac
  done
  if [[ -z $fetch ]]; then
    ssh_workers "$worker" "tail -n 100 $LOGS/$RUN.log"
    return
  fi
  run mkdir -p "$fetch"
  local n
  for ((n = 0; n < $(workers); n++)); do
    run gcloud compute tpus tpu-vm scp "$TPU_NAME:~/jaxlm-logs/$RUN.log" "$fetch/worker-$n.log" \
      --zone "$ZONE" "${project[@]}" --worker="$n"
  done
}

stop() {  # SIGTERM: the trainer saves the current step on every process, then exits
  ssh_workers all "kill -TERM \$(cat $LOGS/$RUN.pid) 2>/dev/null || true"
}

delete() {
  if [[ ${1:-} == --queued ]]; then
    run gcloud compute tpus queued-resources delete "$TPU_NAME" --zone "$ZONE" "${project[@]}" \
      --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" "${project[@]}" --quiet
  fi
}

command=${1:-}
shift || true
case $command in
  create) create "$@" ;;
  setup) setup ;;
  run) start "$@" ;;
  status) status ;;
  logs) logs "$@" ;;
  stop) stop ;;
  delete) delete "$@" ;;
  *) die "usage: $0 [--dry-run] create [--spot|--queued]|setup|run CONFIG WORKDIR [overrides]|\
status|logs [--worker N] [--fetch DIR]|stop|delete [--queued]" ;;
esac
